"""The GPU check: what proves the CUDA path, in one short run, as one summary table.

    sh scripts/gpu_check.sh [--out gpu_check]        # at most 8 minutes on one GPU

Parts (each a subprocess, timed; a part that fails makes the check fail, exit 1):
    1 tests     python -m pytest tests/test_cuda.py (the sync-free training step among them)
    2 bench     python -m MoMKE.bench --device cuda, fp32 and --amp, CMU-MOSI and IEMOCAP-4:
                seconds per epoch, peak CUDA memory, GPU kernel time against wall time
    3 devices   one short CMU-MOSI run (atv, 6 epochs, no dropout, so both devices draw the same
                random numbers) on the GPU and on the CPU: test metrics agree to rounding
    4 runs/GPU  the seven-condition CMU-MOSI table at 20 epochs (10 + 10) with --jobs 1 and with
                the default number of runs per GPU (--jobs auto): wall time of each
Without a CUDA device the CPU parts run (the tests, which skip; the CPU run of part 3), the table
says "no CUDA device", and the check exits 0. It installs nothing and needs no network: the
synthetic data is generated into <out>/data. The table is printed and written to <out>/summary.md
(and the figures to <out>/summary.json).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = "a,t,v,at,av,tv,atv"


def _run(argv: list[str], timeout: float, log: Path) -> tuple[float, str]:
    """Run one part from the repository root; return (seconds, output), or raise with its tail."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[1:])}` exited with {done.returncode} after "
                           f"{seconds:.0f} s; its output is in {log}:\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    return seconds, done.stdout


def _train(out: Path, data: Path, device: str, tag: str, extra: list[str],
           timeout: float) -> tuple[float, list[dict]]:
    folder = out / f"run-{tag}"
    seconds, _ = _run([sys.executable, "-m", "MoMKE.train", "--dataset", "CMUMOSI",
                       "--data-root", str(data), "--output-dir", str(folder), "--device", device,
                       "--force", *extra], timeout, out / f"{tag}.log")
    epochs = next(folder.glob("CMUMOSI/*/epochs.jsonl"))
    return seconds, [json.loads(line) for line in epochs.open()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sh scripts/gpu_check.sh", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"),
                        help="where the data, logs and summary go (default: gpu_check)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="use this synthetic data root instead of generating <out>/data")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden size of the part-3 runs (default: the paper's 256)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data_root.resolve() if args.data_root else out / "data"
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    rows: list[tuple[str, str, str]] = []  # (part, measurement, value)
    figures: dict = {"device": name, "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()

    # 1: the CUDA tests (they skip on a machine without a GPU)
    seconds, output = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                            "tests/test_cuda.py"], 150, out / "tests.log")
    summary_line = next((line.strip("= ") for line in reversed(output.splitlines())
                         if re.search(r"\d+ (passed|skipped|failed)", line)), "no summary")
    rows.append(("1 tests", "tests/test_cuda.py", f"{summary_line} ({seconds:.0f} s)"))

    for dataset in ("CMUMOSI", "IEMOCAPFour"):  # generated once, for every part
        spec_dir = "CMUMOSI" if dataset == "CMUMOSI" else "IEMOCAP"
        if args.data_root is None and not (data / spec_dir).is_dir():
            _run([sys.executable, "-m", "dataloader.synthetic", "--dataset",
                  "IEMOCAPSix" if dataset == "IEMOCAPFour" else dataset, "--out", str(data)],
                 120, out / f"generate-{dataset}.log")

    # 2: the benchmark on the GPU
    if cuda:
        bench_json = out / "bench.json"
        seconds, _ = _run([sys.executable, "-m", "MoMKE.bench", "--device", "cuda", "--datasets",
                           "CMUMOSI,IEMOCAPFour", "--modes", "fp32,amp", "--epochs", "2",
                           "--data-root", str(data), "--json", str(bench_json)], 240,
                          out / "bench.log")
        figures["bench"] = json.loads(bench_json.read_text())
        for m in figures["bench"]:
            busy = m.get("gpu_busy") or {}
            share = (f"; GPU in kernels {100 * busy['kernel_seconds'] / busy['wall_seconds']:.0f}"
                     f" % of a stage-2 atv epoch" if busy else "")
            rows.append((f"2 bench {m['dataset']} {m['mode']}",
                         "epoch s (stage 1 / stage 2 atv), peak CUDA MB",
                         f"{m['stage1']['seconds']:.3f} / {m['stage2']['atv']['seconds']:.3f}; "
                         f"{m['peak_memory']['peak_memory_mb']:.0f} MB{share}"))
        rows.append(("2 bench", "wall time of the part", f"{seconds:.0f} s"))
    else:
        rows.append(("2 bench", "python -m MoMKE.bench --device cuda", "skipped: no CUDA device"))

    # 3: the same short run on both devices
    short = ["--test-condition", "atv", "--epochs", "6", "--stage-epochs", "3", "--hidden",
             str(args.hidden), "--drop-rate", "0", "--threads", "1", "--no-save-checkpoint"]
    cpu_seconds, cpu_epochs = _train(out, data, "cpu", "cpu", short, 120)
    rows.append(("3 devices", "CMU-MOSI atv, 6 epochs on the CPU", f"{cpu_seconds:.0f} s"))
    if cuda:
        gpu_seconds, gpu_epochs = _train(out, data, "cuda", "cuda", short, 120)
        worst = max(abs(c["test"][k] - g["test"][k]) for c, g in zip(cpu_epochs, gpu_epochs)
                    if c["stage"] == 2 for k in ("acc2", "f1", "mae", "corr"))
        agree = worst <= 0.01
        figures["devices"] = {"max_abs_test_difference": worst, "cpu_s": cpu_seconds,
                              "gpu_s": gpu_seconds}
        rows.append(("3 devices", "the same run on the GPU; largest |GPU - CPU| of test "
                     "acc2/f1/mae/corr over stage-2 epochs",
                     f"{gpu_seconds:.0f} s; {worst:.4f} ({'agree' if agree else 'DIFFER'})"))
        if not agree:
            raise SystemExit(_finish(out, rows, figures, name, started, failed=True))
    else:
        rows.append(("3 devices", "the same run on the GPU", "skipped: no CUDA device"))

    # 4: several runs per GPU
    if cuda:
        for jobs in ("1", "auto"):
            folder = out / f"table-jobs-{jobs}"
            seconds, output = _run([sys.executable, "-m", "MoMKE.sweep", "--dataset", "CMUMOSI",
                                    "--data-root", str(data), "--output-dir", str(folder),
                                    "--test-condition", CONDITIONS, "--epochs", "20",
                                    "--stage-epochs", "10", "--device", "cuda", "--jobs", jobs,
                                    "--force"], 120, out / f"table-jobs-{jobs}.log")
            said = next((line for line in output.splitlines() if "run(s) at once" in line
                         or "runs at once" in line), "one run at a time")
            figures[f"table_jobs_{jobs}"] = seconds
            rows.append((f"4 runs/GPU --jobs {jobs}", "seven-condition CMU-MOSI table, 20 "
                         "epochs (10 + 10)", f"{seconds:.0f} s ({said.strip()})"))
    else:
        rows.append(("4 runs/GPU", "seven conditions with --jobs 1 and auto",
                     "skipped: no CUDA device"))
    return _finish(out, rows, figures, name, started, failed=False)


def _finish(out: Path, rows: list[tuple[str, str, str]], figures: dict, name: str,
            started: float, *, failed: bool) -> int:
    lines = [f"# GPU check, {figures['date']}: {name} (torch {figures['torch']})", "",
             "| part | measurement | result |", "|---|---|---|"]
    lines += [f"| {part} | {what} | {value} |" for part, what, value in rows]
    lines += ["", f"Total {time.perf_counter() - started:.0f} s."
              + (" FAILED." if failed else "")]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(figures, indent=2))
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"GPU check FAILED: {error}", file=sys.stderr)
        sys.exit(1)
