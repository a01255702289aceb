"""Benchmark: how fast one epoch runs, how well it uses the machine, and what a sweep costs.

    python -m MoMKE.bench                      # CPU, CMU-MOSI, IEMOCAP-4 (one fold), CMU-MOSEI
    python -m MoMKE.bench --device cuda --datasets CMUMOSI
    python -m MoMKE.bench --modes fp32,amp     # which arithmetic (default: all four)

Each mode is one way of running the same model: fp32; amp (bfloat16 autocast, `--amp`); compile
(the expert stack under torch.compile, `--compile`); amp+compile. Each dataset and mode runs in its
own subprocess, so its peak memory and compilation are its own.

Measured on the synthetic datasets at the real sizes (generated into --data-root when absent) with
the paper's hyperparameters. Printed per dataset: seconds per epoch of stage 1 and of stage 2 (all seven conditions, and
two missing rates), utterances per second, achieved model GFLOP/s against this machine's fp32
matmul throughput measured in the same run at the model's shapes, the share of compute the padded
official computation spends on padding (and the share left here), peak memory, and the projected
wall time of each run script at the paper's epochs, with and without stage-1 reuse, and the floor:
the same figures with every model FLOP run at the measured matmul throughput, fp32 and bfloat16
(the two floors). A compiled mode's compilation (its first epoch, and a later one when a new
shape specialises) is reported as compile seconds and added to the projected wall times. With `--official-code PATH` the official implementation runs
in the same invocation (fold 1, the same epochs) and the ratios use its measured seconds; without
it they use the figures in the dataset table (`DatasetSpec.official_seconds`: another day on
this machine kind).

What is timed is what the run scripts pay: real runs (`MoMKE.runner.run`: run folder, epoch log,
checkpoint, predictions, stage-1 cache) in a temporary output folder, one warm-up and `--epochs`
measured epochs per stage, medians; a run's cost beyond its epochs is its overhead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dataloader.batch import BatchBuilder
from dataloader.datasets import get_spec
from dataloader.gcnet import load_dataset
from dataloader.synthetic import generate
from MoMKE.config import TrainConfig
from MoMKE.experiments.throughput import matmul_throughput, model_flops, step_operations
from MoMKE.model import MODALITIES, MoMKE
from MoMKE.protocols import CONDITIONS, RATES, MissingSetting
from MoMKE.runtime import bf16_supported, peak_memory, resolve_device
from MoMKE.runner import as_run_on, run
from MoMKE.trainer import FoldTrainer

MODES = {"fp32": {}, "amp": {"amp": True}, "compile": {"compile": True},
         "amp+compile": {"amp": True, "compile": True}}
BENCH_RATES = (0.3, 0.7)  # measured; other rates interpolate linearly (0.0 is condition atv)


@dataclasses.dataclass
class EpochCost:
    seconds: float  # median of the measured epochs (the first of each stage is a warm-up)
    utterances: int  # processed per epoch: training pass plus evaluated splits
    flops: float  # model FLOPs per epoch: 3x forward for training, 1x for evaluation
    real_tokens: int  # utterances of the training batches
    padded_tokens: int  # B x L slots of the training batches (what padded code computes)
    grid_slots: int  # slots of the packed attention grids (per modality, summed): real + holes
    grid_tokens: int  # observed utterances placed in those grids
    excess_seconds: float = 0.0  # every epoch's time over the steady one: compilation
    epochs: int = 0  # how many epochs the median is over


class _Meter:
    """Counts the FLOPs and tokens of every model call, per run and stage, while active (it
    wraps `MoMKE.forward` of the class: the runs build their own models)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], dict[str, float]] = {}
        self.run = ""

    def __enter__(self) -> "_Meter":
        forward = MoMKE.forward
        meter = self

        def counted(model, features, layout, stage):
            c = meter.counts.setdefault((meter.run, stage), dict.fromkeys(
                ("flops", "utterances", "real", "padded", "slots", "placed"), 0.0))
            c["flops"] += model_flops(layout, model.config, stage) * (3 if model.training else 1)
            c["utterances"] += layout.valid.shape[0]
            if model.training:
                c["real"] += layout.valid.shape[0]
                c["padded"] += layout.conversations * layout.length
                c["slots"] += sum(layout.row_counts[m] * layout.length for m in MODALITIES
                                  if layout.count(m))
                c["placed"] += sum(layout.count(m) for m in MODALITIES)
            return forward(model, features, layout, stage)

        self._forward, MoMKE.forward = forward, counted
        return self

    def __exit__(self, *exc) -> None:
        MoMKE.forward = self._forward


def _cost(records: list[dict], counts: dict[str, float]) -> dict:
    """An EpochCost from one stage's epoch records of a run (trained here, not reused) and what
    the meter counted over them."""
    seconds = [r["seconds"] for r in records]
    n = len(records)
    steady = float(np.median(seconds[1:] if n > 1 else seconds))
    return dataclasses.asdict(EpochCost(
        steady, int(counts["utterances"] // n),
        counts["flops"] / n, int(counts["real"] // n), int(counts["padded"] // n),
        int(counts["slots"] // n), int(counts["placed"] // n),
        sum(max(0.0, s - steady) for s in seconds), max(n - 1, 1)))


# A compiled run compiles again after its first epoch: the first batch with a single packed
# row (a size the compiler specialises) triggers it, in whichever epoch that batch comes
# (CMU-MOSI stage 1: epoch 2, 10-25 s). Over two measured epochs that one epoch was half the
# median (5.2 s for a 0.3 s epoch); over four the median is a steady epoch.
COMPILED_MEASURED_EPOCHS = 4


def measured_epochs(requested: int, *, compiled: bool) -> int:
    """Epochs measured per stage after the warm-up: at least four when the run is compiled."""
    return max(requested, COMPILED_MEASURED_EPOCHS) if compiled else requested


def measure(dataset: str, data_root: Path, device: torch.device, epochs: int,
            mode: str = "fp32") -> dict:
    """Everything the report needs for one dataset in one mode (`MODES`), measured in this
    process on real runs: `MoMKE.runner.run`, what the run scripts call, with its run folder,
    epoch log, checkpoints and stage-1 cache, in a temporary output folder. Each stage runs one
    warm-up epoch and `epochs` measured ones (at least four when compiled; fold 1); the seven conditions reuse the stage 1 of
    the first, as in a sweep; two missing rates train their own. Per run, what it costs beyond
    its epochs (folder, checkpoints, predictions, stage-1 cache) is its overhead."""
    data = load_dataset(dataset, data_root)
    paper = get_spec(dataset).paper
    batch, total, stage_epochs = paper.batch_size, paper.epochs, paper.stage_epochs
    bf16 = bf16_supported(device)
    settings = [MissingSetting("fixed", condition=c) for c in ("atv", *CONDITIONS[:-1])] + \
        [MissingSetting("random", rate=r) for r in BENCH_RATES]
    with tempfile.TemporaryDirectory() as output, _Meter() as meter:
        epochs = measured_epochs(epochs, compiled=bool(MODES[mode].get("compile")))
        config = TrainConfig(dataset=dataset, data_root=str(data_root), device=str(device),
                             output_dir=output, epochs=2 * (1 + epochs), stage_epochs=1 + epochs,
                             folds=[1], **MODES[mode]).resolved()
        config = as_run_on(config, device)
        out = {"dataset": dataset, "mode": mode, "device": str(device), "batch_size": batch,
               "epochs": total, "stage_epochs": stage_epochs, "folds": len(data.folds),
               "threads": torch.get_num_threads(), "chunk_utterances": config.chunk_utterances,
               "bf16": bf16, "amp_ran": config.amp, "stage2": {}, "random": {},
               "overhead_seconds": []}
        peaks = []
        for setting in settings:
            meter.run = setting.name
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the epoch lines
                run(config, data, setting, device)
            wall = time.perf_counter() - started
            folder = next(Path(output, dataset).glob(f"{setting.name}_seed*/result.json")).parent
            records = [json.loads(line) for line in (folder / "epochs.jsonl").open()]
            trained = [r for r in records if not r.get("reused_stage1")]
            out["overhead_seconds"].append(wall - sum(r["seconds"] for r in trained))
            peaks.append(max(r["peak_memory_mb"] for r in trained))
            by_stage = {stage: [r for r in trained if r["stage"] == stage] for stage in (1, 2)}
            costs = {stage: _cost(rs, meter.counts[setting.name, stage])
                     for stage, rs in by_stage.items() if rs}
            if setting.protocol == "random":
                out["random"][str(setting.rate)] = {"stage1": costs[1], "stage2": costs[2]}
                continue
            out["stage2"][setting.condition] = costs[2]
            if 1 in costs:
                out["stage1"] = costs[1]
    out["peak_memory"] = {**peak_memory(device), "peak_memory_mb": max(peaks)}
    out["overhead"] = float(np.median(out["overhead_seconds"]))
    # What compiling cost: every epoch's excess over the steady one, in both stages of the first
    # run (later runs of the same process reuse the compiled code, as the runs of a sweep do).
    out["compile_seconds"] = sum(c["excess_seconds"]
                                 for c in (out["stage1"], out["stage2"]["atv"])) \
        if config.compile else 0.0
    batches = -(-len(data.folds[0].train) // batch)
    tokens = 3 * out["stage2"]["atv"]["real_tokens"] // batches
    out["matmul_gflops"] = matmul_throughput(device, config.hidden, tokens)
    out["bf16_matmul_gflops"] = matmul_throughput(device, config.hidden, tokens,
                                                  torch.bfloat16) if bf16 else None
    # A compiled step runs generated kernels, not ATen operations: counted in eager modes only.
    out["step_operations"] = None if config.compile else step_operations(FoldTrainer(
        config, data, 0, MissingSetting("fixed", condition="atv"), device,
        BatchBuilder(data, device)))
    if device.type == "cuda":
        out["gpu_busy"] = gpu_busy(config, data, device)
    return out


def gpu_busy(config: TrainConfig, data, device: torch.device) -> dict[str, float]:
    """One stage-2 atv epoch under the profiler: wall seconds against the seconds the GPU spent
    in kernels (how much of the epoch the GPU works; the rest it waits for the host), and the
    epoch's training steps (its evaluation included in the wall seconds)."""
    from torch.profiler import ProfilerActivity, profile
    fold = FoldTrainer(config, data, 0, MissingSetting("fixed", condition="atv"), device,
                       BatchBuilder(data, device))
    fold._epoch(2, 1, lambda record: None, None)  # warm-up, evaluation batches built
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        fold._epoch(2, 2, lambda record: None, None)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    kernels = sum(event.self_device_time_total for event in profiler.key_averages()
                  if event.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    steps = -(-len(fold.splits["train"]) // config.batch_size)  # training steps of the epoch
    return {"wall_seconds": wall, "kernel_seconds": kernels, "steps": steps}


# ----------------------------------------------------------------------------- projection

def projected_seconds(m: dict, *, reuse: bool) -> dict[str, float]:
    """Wall time of the run script (7 conditions + 8 rates, every fold) at the paper's epochs,
    one run after another: epochs at their measured seconds plus each run's measured overhead
    (per fold)."""
    s1, s2 = m["stage_epochs"], m["epochs"] - m["stage_epochs"]
    stage1, overhead = m["stage1"]["seconds"], m.get("overhead", 0.0)
    conditions = sum(s2 * m["stage2"][c]["seconds"] + overhead for c in CONDITIONS)
    table = (1 if reuse else len(CONDITIONS)) * s1 * stage1 + conditions
    points = {0.0: (stage1, m["stage2"]["atv"]["seconds"])}
    points.update({float(r): (v["stage1"]["seconds"], v["stage2"]["seconds"])
                   for r, v in m["random"].items()})
    rates = sorted(points)
    per_rate = 0.0
    for rate in RATES:
        s1_cost = np.interp(rate, rates, [points[r][0] for r in rates])
        s2_cost = np.interp(rate, rates, [points[r][1] for r in rates])
        per_rate += s1 * s1_cost + s2 * s2_cost + overhead
    folds, compiling = m["folds"], m.get("compile_seconds", 0.0)  # compiled once per process
    return {"conditions": table * folds + compiling, "rates": per_rate * folds + compiling,
            "script": (table + per_rate) * folds + compiling}


def at_matmul_peak(m: dict, throughput: str = "matmul_gflops") -> dict:
    """`m` with every measured epoch's seconds replaced by its model FLOPs run at the matmul
    throughput measured in the same run (`throughput`: fp32 `matmul_gflops` or
    `bf16_matmul_gflops`): a floor for the same computation on this machine."""
    peak = m[throughput] * 1e9
    floor = copy.deepcopy(m)
    floor["compile_seconds"] = 0.0
    costs = [floor["stage1"], *floor["stage2"].values(),
             *(v[stage] for v in floor["random"].values() for stage in ("stage1", "stage2"))]
    for cost in costs:
        cost["seconds"] = cost["flops"] / peak
    return floor


def summarise(m: dict) -> list[str]:
    stage2 = m["stage2"]
    atv, mean2 = stage2["atv"], float(np.mean([stage2[c]["seconds"] for c in CONDITIONS]))
    train_flops = atv["flops"]
    arithmetic = {True: "bfloat16 autocast", False: "float32"}[m.get("amp_ran", False)]
    if m.get("mode", "fp32").startswith("amp") and not m.get("amp_ran"):
        arithmetic += " (this device has no bfloat16: --amp ran float32)"
    lines = [f"== {m['dataset']} [{m.get('mode', 'fp32')}: {arithmetic}"
             f"{', compiled expert stack' if 'compile' in m.get('mode', '') else ''}; chunks of "
             f"{m.get('chunk_utterances', 256)}] (synthetic, real size; fold 1 of {m['folds']}; "
             f"batch {m['batch_size']}; {m['threads']} threads; {m['device']})",
             f"stage 1 epoch: {m['stage1']['seconds']:.2f} s "
             f"({m['stage1']['utterances'] / m['stage1']['seconds']:.0f} utterances/s)",
             f"stage 2 epoch: atv {atv['seconds']:.2f} s "
             f"({atv['utterances'] / atv['seconds']:.0f} utterances/s); mean of the seven "
             f"conditions {mean2:.2f} s (" + ", ".join(
                 f"{c} {stage2[c]['seconds']:.2f}" for c in CONDITIONS) + ")"
             + (f"; {m['step_operations']} ATen compute operations per stage-2 training step"
                if m.get("step_operations") else ""),
             "random rates, epoch seconds: " + ", ".join(
                 f"{r}: stage 1 {v['stage1']['seconds']:.2f} / stage 2 {v['stage2']['seconds']:.2f}"
                 for r, v in m["random"].items())]
    if m.get("compile_seconds"):
        lines.append(f"compilation: {m['compile_seconds']:.1f} s (the epochs' excess over the "
                     f"steady one; counted once per process in the projections below)")
    achieved = train_flops / atv["seconds"] / 1e9
    floors = f"{m['matmul_gflops']:.1f} GFLOP/s fp32 matmul"
    if m.get("bf16_matmul_gflops"):
        floors += f", {m['bf16_matmul_gflops']:.1f} bf16 matmul"
    lines.append(f"model throughput, stage 2 atv epoch: {achieved:.1f} GFLOP/s achieved vs "
                 f"{floors} at the model's shapes (ratio to fp32 "
                 f"{achieved / m['matmul_gflops']:.2f}"
                 + (f", to bf16 {achieved / m['bf16_matmul_gflops']:.2f})"
                    if m.get("bf16_matmul_gflops") else ")"))
    padding = 1 - atv["real_tokens"] / atv["padded_tokens"]
    holes = 1 - atv["grid_tokens"] / atv["grid_slots"]
    lines.append(f"padding: a padded computation spends {100 * padding:.0f} % of its per-token "
                 f"work on padding slots (stage 2, atv); here only attention sees empty slots "
                 f"({100 * holes:.0f} % of its packed grids), every other layer real tokens only")
    memory = m["peak_memory"]
    lines.append(f"peak memory: {memory['peak_memory_mb']:.0f} MB ({memory['memory']})")
    with_reuse, without = projected_seconds(m, reuse=True), projected_seconds(m, reuse=False)
    lines.append(f"projected at the paper's epochs ({m['epochs']} = {m['stage_epochs']} + "
                 f"{m['epochs'] - m['stage_epochs']}, {m['folds']} fold(s)): seven-condition "
                 f"table {with_reuse['conditions'] / 60:.1f} min with stage-1 reuse, "
                 f"{without['conditions'] / 60:.1f} min without; whole run script (7 conditions "
                 f"+ 8 rates) {with_reuse['script'] / 60:.1f} min with reuse, "
                 f"{without['script'] / 60:.1f} min without")
    for name, key in (("fp32", "matmul_gflops"), ("bf16", "bf16_matmul_gflops")):
        if not m.get(key):
            continue
        floor = at_matmul_peak(m, key)
        lines.append(f"{name} floor (every model FLOP at the measured {name} matmul throughput, "
                     f"evaluation included): stage 1 epoch {floor['stage1']['seconds']:.2f} s, "
                     f"stage 2 atv epoch {floor['stage2']['atv']['seconds']:.2f} s, "
                     f"seven-condition table "
                     f"{projected_seconds(floor, reuse=True)['conditions'] / 60:.1f} min")
    lines.append(f"per run beyond its epochs (run folder, checkpoint, predictions, stage-1 "
                 f"cache): {m.get('overhead', 0.0):.2f} s (median of {len(m.get('overhead_seconds', []))}"
                 f" runs; in the projections)")
    if m.get("gpu_busy"):
        busy = m["gpu_busy"]
        lines.append(f"GPU: a stage-2 atv epoch of {busy['wall_seconds']:.2f} s wall keeps the GPU "
                     f"in kernels for {busy['kernel_seconds']:.2f} s "
                     f"({100 * busy['kernel_seconds'] / busy['wall_seconds']:.0f} %)")
    official, where = _official(m)
    if official:
        lines.append(
            f"vs the official implementation ({where}: {official['stage1']:.2f} s / "
            f"{official['stage2']:.2f} s per epoch): stage 1 "
            f"x{official['stage1'] / m['stage1']['seconds']:.1f} faster, stage 2 atv "
            f"x{official['stage2'] / atv['seconds']:.1f}")
    return lines


def _official(m: dict) -> tuple[dict | None, str]:
    """The official code's seconds per epoch (stage 1, stage 2 atv): measured in this run when
    --official-code was given, else the figures measured earlier (the dataset table)."""
    if m.get("official"):
        return m["official"], f"measured in this run, {m['official']['threads']} thread(s)"
    quoted = get_spec(m["dataset"]).official_seconds
    return (None if quoted is None else dataclasses.asdict(quoted),
            "measured earlier on the same machine kind (docs/precision-and-speed.md)")


def compare(figures: list[dict]) -> list[str]:
    """One Markdown table of the modes measured for one dataset, measured in one run."""
    official, where = _official(figures[0])
    lines = [f"== {figures[0]['dataset']}: the modes side by side (seconds per epoch; tables and "
             f"scripts projected at the paper's epochs, one run at a time, stage 1 reused, "
             f"compilation included"
             + (f"; official code {where}: {official['stage1']:.2f} s / {official['stage2']:.2f}"
                f" s)" if official else ")"),
             "| mode | stage 1 | stage 2 atv | stage 2, mean of 7 | compile | peak MB | "
             "7-condition table | whole script |" + (" vs official (stage 1 / 2 atv) |"
                                                     if official else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if official else "")]
    for m in figures:
        mean2 = float(np.mean([m["stage2"][c]["seconds"] for c in CONDITIONS]))
        projected = projected_seconds(m, reuse=True)
        row = (f"| {m['mode']} | {m['stage1']['seconds']:.2f} | "
               f"{m['stage2']['atv']['seconds']:.2f} | {mean2:.2f} | "
               f"{m.get('compile_seconds', 0.0):.0f} s | "
               f"{m['peak_memory']['peak_memory_mb']:.0f} | {projected['conditions'] / 60:.1f} min "
               f"| {projected['script'] / 60:.1f} min |")
        if official:
            row += (f" x{official['stage1'] / m['stage1']['seconds']:.1f} / "
                    f"x{official['stage2'] / m['stage2']['atv']['seconds']:.1f} |")
        lines.append(row)
    return lines


def measure_official(checkout: Path, dataset: str, data_root: Path, device: torch.device,
                     epochs: int, threads: int) -> dict:
    """The official code's seconds per epoch on fold 1, stage 1 and stage 2 atv, at the paper's
    batch size: one warm-up and `epochs` measured epochs per stage, medians (MoMKE/experiments/official.py
    times its log lines as they arrive)."""
    from dataloader.gcnet import feature_names_from
    from MoMKE.experiments import official
    found = official.check_checkout(checkout)
    official.check_dependencies(found.path)
    names = feature_names_from()
    official.check_data(data_root, dataset, names)
    paper = get_spec(dataset).paper
    with tempfile.TemporaryDirectory() as folder:
        copy = official.prepare(found, Path(folder), data_root)
        argv = official.command(dataset=dataset, condition="atv", seed=66,
                                epochs=2 * (1 + epochs), stage_epochs=1 + epochs,
                                batch_size=paper.batch_size, lr=paper.lr, l2=paper.l2,
                                hidden=paper.hidden, depth=paper.depth,
                                num_heads=paper.num_heads, drop_rate=paper.drop_rate,
                                attn_drop_rate=paper.attn_drop_rate,
                                feature_names=names, device=str(device))
        done = official.run(copy, argv, Path(folder) / "official.log",
                            regression=get_spec(dataset).is_regression, stage_epochs=1 + epochs,
                            threads=threads, stop_after_folds=1)
    seconds = {stage: [s for st, _, s in done.folds[0].epoch_seconds if st == stage]
               for stage in (1, 2)}
    return {"stage1": float(np.median(seconds[1][1:])), "stage2": float(np.median(seconds[2][1:])),
            "threads": threads, "commit": found.commit, "peak_rss_mb": done.peak_rss_mb}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MoMKE.bench", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="CMUMOSI,IEMOCAPFour,CMUMOSEI",
                        help="comma list (default: CMUMOSI,IEMOCAPFour,CMUMOSEI)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma list among {', '.join(MODES)} (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="measured epochs per stage after one warm-up (default 2)")
    parser.add_argument("--data-root", type=Path, default=Path("features/synthetic"),
                        help="where the synthetic sets are (generated when absent)")
    parser.add_argument("--official-code", type=Path, default=None,
                        help="a checkout of the official MoMKE code: its seconds per epoch are "
                             "measured in the same run (CMU-MOSI, IEMOCAP-4) and the ratios use "
                             "them (it needs pandas); without it they use quoted figures")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        parser.error(f"--modes {args.modes!r}: use a comma list among {', '.join(MODES)}.")
    device = resolve_device(args.device)
    if args.worker:  # one dataset and mode, in its own process: print its figures as JSON
        print(json.dumps(measure(args.worker, args.data_root, device, args.epochs, modes[0])))
        return 0
    figures = []
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        spec = get_spec(dataset)
        if not (args.data_root / spec.folder / spec.label_file).is_file():
            print(f"generating the synthetic {dataset} set into {args.data_root}", flush=True)
            generate(dataset, args.data_root)
        reference = None
        if args.official_code is not None:
            try:
                reference = measure_official(args.official_code, dataset, args.data_root, device,
                                             args.epochs, torch.get_num_threads())
            except ValueError as error:  # OfficialError, DataError: one sentence
                print(f"error: {error}", file=sys.stderr)
                return 2
        measured = []
        for mode in modes:
            done = subprocess.run([sys.executable, "-m", "MoMKE.bench", "--worker", dataset,
                                   "--modes", mode, "--device", str(device), "--epochs",
                                   str(args.epochs), "--data-root", str(args.data_root)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            measured.append({**json.loads(done.stdout.strip().splitlines()[-1]),
                             "official": reference})
            print("\n".join(summarise(measured[-1])), flush=True)
        if len(measured) > 1:
            print("\n".join(compare(measured)), flush=True)
        figures += measured
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
