"""The GPU check: what proves the CUDA path and what decides further GPU work, as one table.

    sh scripts/gpu_check.sh [--out DIR] [--deadline 480]     # at most 8 minutes in all

Parts, in this order (what decides further GPU work first), each a subprocess given what remains
of one overall deadline:
    1 bench     python -m MoMKE.bench --device cuda, fp32 then --amp, CMU-MOSI and IEMOCAP-4, one
                invocation each (one warm-up and one measured epoch per stage): seconds per epoch,
                the GPU-busy share of a stage-2 epoch (kernel time over wall time,
                torch.profiler), seconds per training step, operations per step, peak CUDA memory
    2 tests     python -m pytest tests/test_cuda.py (the sync-free training steps among them)
    3 devices   one short CMU-MOSI run (atv, 6 epochs, no dropout, so both devices draw the same
                random numbers) on the GPU and on the CPU: test metrics agree to rounding
    4 runs/GPU  the seven-condition CMU-MOSI table at 20 epochs (10 + 10) with --jobs 1 and with
                the default number of runs per GPU (--jobs auto): wall time of each
The table is written after every part, so a part that fails or runs out of time is a row saying
FAILED with its log's name, and the rows before it stay. Exit 1 when a part failed, else 0.
Without a CUDA device the CPU parts run (the tests, which skip; the CPU run of part 3), the table
says "no CUDA device", and the check exits 0. It installs nothing and needs no network.

--out (default: a fresh folder under the system's temporary folder, never the repository) holds
at most 8 files: summary.md, summary.json and one log per part (data.log, bench.log, tests.log,
devices.log, table.log). Data and run folders go to a scratch folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = "a,t,v,at,av,tv,atv"
COMMAND = 'sh scripts/gpu_check.sh --out "$OUT"'  # what a GPU machine runs, from the repository


class PartFailed(RuntimeError):
    """A part exited with an error or ran out of the time left."""


class Check:
    """The parts' table, their logs and the one deadline they share."""

    def __init__(self, out: Path, deadline: float, name: str) -> None:
        self.out, self.name = out, name
        self.started = time.perf_counter()
        self.end = self.started + deadline
        self.rows: list[tuple[str, str, str]] = []  # (part, measurement, result)
        self.figures: dict = {"device": name, "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d"), "command": COMMAND}
        self.failed = False

    def left(self) -> float:
        return self.end - time.perf_counter()

    def run(self, argv: list[str], log: str) -> tuple[float, str]:
        """Run `argv` from the repository root within the time left, its output appended to
        `log` as it comes; return (seconds, output), or raise PartFailed."""
        budget = self.left() - 5  # a few seconds to write the table
        if budget <= 5:
            raise PartFailed(f"no time left of the deadline (see {log})")
        path = self.out / log
        with path.open("a") as sink:
            sink.write(f"$ {' '.join(argv[1:])}\n")
            sink.flush()
            start = sink.tell()
            started = time.perf_counter()
            # A session of its own: a timeout ends the part with the processes it started.
            process = subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)},
                                       start_new_session=True)
            try:
                code = process.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise PartFailed(f"out of time after {budget:.0f} s (see {log})") from None
        seconds = time.perf_counter() - started
        with path.open() as written:
            written.seek(start)
            output = written.read()
        if code != 0:
            print(output[-2000:], file=sys.stderr)
            raise PartFailed(f"exited with {code} after {seconds:.0f} s (see {log})")
        return seconds, output

    def row(self, part: str, what: str, result: str) -> None:
        self.rows.append((part, what, result))
        self.write()

    def fail(self, part: str, what: str, error: PartFailed) -> None:
        self.failed = True
        print(f"GPU check FAILED: part {part}: {error}", file=sys.stderr)
        self.row(part, what, f"FAILED: {error}")

    def write(self) -> str:
        lines = [f"# GPU check, {self.figures['date']}: {self.name} (torch "
                 f"{self.figures['torch']})", "", "| part | measurement | result |",
                 "|---|---|---|"]
        lines += [f"| {part} | {what} | {value} |" for part, what, value in self.rows]
        lines += ["", f"{time.perf_counter() - self.started:.0f} s so far."
                  + (" FAILED." if self.failed else ""),
                  f"Run it on a GPU machine, from the repository: {COMMAND}"]
        text = "\n".join(lines) + "\n"
        (self.out / "summary.md").write_text(text)
        (self.out / "summary.json").write_text(json.dumps(self.figures, indent=2))
        return text


def _bench_row(check: Check, m: dict) -> None:
    busy = m.get("gpu_busy") or {}
    result = (f"{m['stage1']['seconds']:.3f} / {m['stage2']['atv']['seconds']:.3f} s; "
              f"{m['peak_memory']['peak_memory_mb']:.0f} MB")
    if busy:
        result += (f"; GPU busy {100 * busy['kernel_seconds'] / busy['wall_seconds']:.0f} % of a "
                   f"stage-2 atv epoch; {1000 * busy['wall_seconds'] / busy['steps']:.1f} ms per "
                   f"step (evaluation included)")
    if m.get("step_operations"):
        result += f"; {m['step_operations']} operations per step"
    check.row(f"1 bench {m['dataset']} {m['mode']}", "epoch s (stage 1 / stage 2 atv), peak "
              "CUDA MB, GPU-busy share, time and ATen operations per step", result)


def parts(check: Check, data: Path, scratch: Path, cuda: bool, hidden: int,
          generate: bool) -> None:
    py = sys.executable
    if generate:  # once, for every part
        for dataset in ("CMUMOSI", "IEMOCAPSix"):
            try:
                check.run([py, "-m", "dataloader.synthetic", "--dataset", dataset, "--out",
                           str(data)], "data.log")
            except PartFailed as error:
                check.fail("data", f"synthetic {dataset}", error)
                return

    if cuda:  # 1: the benchmark on the GPU, one dataset and mode at a time, fp32 first
        check.figures["bench"] = []
        for mode in ("fp32", "amp"):
            for dataset in ("CMUMOSI", "IEMOCAPFour"):
                figures = scratch / f"bench-{dataset}-{mode}.json"
                try:
                    check.run([py, "-m", "MoMKE.bench", "--device", "cuda", "--datasets",
                               dataset, "--modes", mode, "--epochs", "1", "--data-root",
                               str(data), "--json", str(figures)], "bench.log")
                except PartFailed as error:
                    check.fail(f"1 bench {dataset} {mode}", "python -m MoMKE.bench", error)
                    continue
                for m in json.loads(figures.read_text()):
                    check.figures["bench"].append(m)
                    _bench_row(check, m)
    else:
        check.row("1 bench", "python -m MoMKE.bench --device cuda", "skipped: no CUDA device")

    try:  # 2: the CUDA tests (they skip on a machine without a GPU)
        seconds, output = check.run([py, "-m", "pytest", "-p", "no:cacheprovider",
                                     "tests/test_cuda.py"], "tests.log")
        said = next((line.strip("= ") for line in reversed(output.splitlines())
                     if re.search(r"\d+ (passed|skipped|failed)", line)), "no summary")
        check.row("2 tests", "tests/test_cuda.py", f"{said} ({seconds:.0f} s)")
    except PartFailed as error:
        check.fail("2 tests", "tests/test_cuda.py", error)

    # 3: the same short run on both devices
    short = ["--test-condition", "atv", "--epochs", "6", "--stage-epochs", "3", "--hidden",
             str(hidden), "--drop-rate", "0", "--threads", "1", "--no-save-checkpoint"]
    runs = {}
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        folder = scratch / f"run-{device}"
        try:
            seconds, _ = check.run([py, "-m", "MoMKE.train", "--dataset", "CMUMOSI",
                                    "--data-root", str(data), "--output-dir", str(folder),
                                    "--device", device, "--force", *short], "devices.log")
        except PartFailed as error:
            check.fail("3 devices", f"CMU-MOSI atv, 6 epochs on the {device}", error)
            continue
        epochs = next(folder.glob("CMUMOSI/*/epochs.jsonl"))
        runs[device] = (seconds, [json.loads(line) for line in epochs.open()])
        if device == "cpu":
            check.row("3 devices", "CMU-MOSI atv, 6 epochs on the CPU", f"{seconds:.0f} s")
    if len(runs) == 2:
        (cpu_seconds, cpu_epochs), (gpu_seconds, gpu_epochs) = runs["cpu"], runs["cuda"]
        worst = max(abs(c["test"][k] - g["test"][k]) for c, g in zip(cpu_epochs, gpu_epochs)
                    if c["stage"] == 2 for k in ("acc2", "f1", "mae", "corr"))
        agree = worst <= 0.01
        check.failed |= not agree
        check.figures["devices"] = {"max_abs_test_difference": worst, "cpu_s": cpu_seconds,
                                    "gpu_s": gpu_seconds}
        check.row("3 devices", "the same run on the GPU; largest |GPU - CPU| of test "
                  "acc2/f1/mae/corr over stage-2 epochs",
                  f"{gpu_seconds:.0f} s; {worst:.4f} ({'agree' if agree else 'DIFFER'})")
    elif not cuda:
        check.row("3 devices", "the same run on the GPU", "skipped: no CUDA device")

    if not cuda:  # 4: several runs per GPU
        check.row("4 runs/GPU", "seven conditions with --jobs 1 and auto",
                  "skipped: no CUDA device")
        return
    for jobs in ("1", "auto"):
        what = "seven-condition CMU-MOSI table, 20 epochs (10 + 10)"
        try:
            seconds, output = check.run([py, "-m", "MoMKE.sweep", "--dataset", "CMUMOSI",
                                         "--data-root", str(data), "--output-dir",
                                         str(scratch / f"table-jobs-{jobs}"), "--test-condition",
                                         CONDITIONS, "--epochs", "20", "--stage-epochs", "10",
                                         "--device", "cuda", "--jobs", jobs, "--force"],
                                        "table.log")
        except PartFailed as error:
            check.fail(f"4 runs/GPU --jobs {jobs}", what, error)
            continue
        said = next((line for line in output.splitlines() if "run(s) at once" in line
                     or "runs at once" in line), "one run at a time")
        check.figures[f"table_jobs_{jobs}"] = seconds
        check.row(f"4 runs/GPU --jobs {jobs}", what, f"{seconds:.0f} s ({said.strip()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sh scripts/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="where the table and logs go, at most 8 files (default: a fresh "
                             "temporary folder, printed)")
    parser.add_argument("--deadline", type=float, default=480.0,
                        help="seconds for the whole check; each part gets what remains "
                             "(default 480: 8 minutes)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="use this synthetic data root instead of generating one")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden size of the part-3 runs (default: the paper's 256)")
    args = parser.parse_args(argv)
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="momke-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    check = Check(out, args.deadline, torch.cuda.get_device_name(0) if cuda else "no CUDA device")
    print(f"GPU check: table and logs in {out}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="momke-gpu-check-scratch-"))
    data = args.data_root.resolve() if args.data_root else scratch / "data"
    try:
        parts(check, data, scratch, cuda, args.hidden, generate=args.data_root is None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        print(check.write())
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
