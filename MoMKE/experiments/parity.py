"""Parity with the authors' code: run the official MoMKE beside this one on the same data, over
seeds, and write the table that compares them.

    python -m MoMKE.parity --official-code ../MoMKE --dataset CMUMOSI \
        --data-root features/synthetic --test-condition a,t,v,atv --seeds 66,67,68 \
        --out parity/CMUMOSI [--epochs 300 --stage-epochs 150] [--jobs 2 --threads 1]

For each condition and seed the official code runs from a temporary copy of the
user's checkout (MoMKE/experiments/official.py: its config.py pointed at the data, its own command line with
the run scripts' hyperparameters); then this project runs the same settings twice through the
sweep, with `--official` (the official code's selection pool, hand-over and MAE/Corr) and with
its defaults. `parity.md` and `parity.csv` give, per condition and metric, the official mean ± std
over seeds, ours with `--official` and ours by default; for the `--official` pair the difference
of means with Welch's 95 % interval over seeds and a verdict (MoMKE/results/equivalence.py); and the wall
time and peak memory of both codes. The official code numbers its epochs from 0; here every epoch
is numbered from 1. Official runs are kept under `<out>/official/` and reused when the harness is
run again with the same command; ours resume as any sweep does.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from dataloader.datasets import DataError, get_spec
from dataloader.gcnet import feature_names_from
from MoMKE.config import ConfigError, TrainConfig, parse_config
from MoMKE.experiments import official, sweep
from MoMKE.protocols import CONDITIONS
from MoMKE.results import equivalence
from MoMKE.results.collect import collect
from MoMKE.runlog import setup_console_logging

log = logging.getLogger("MoMKE")

# Hyperparameter flags the harness passes to both codes (the rest are the paper's defaults).
SHARED_FLAGS = ("epochs", "stage_epochs", "batch_size", "lr", "l2", "hidden", "depth",
                "num_heads", "drop_rate", "attn_drop_rate")
# What the official log reports, in this project's metric names (CMU MAE/Corr on non-zero labels).
REPORTED = {"regression": ("acc2", "f1", "mae_nonzero", "corr_nonzero"),
            "classification": ("wa", "ua")}
LAST = {"regression": ("acc2", "f1", "mae_nonzero", "corr_nonzero"),
        "classification": ("wa", "ua", "f1")}
NAMES = {"acc2": "Acc2", "f1": "F1", "mae_nonzero": "MAE (non-zero)",
         "corr_nonzero": "Corr (non-zero)", "wa": "WA", "ua": "UA"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m MoMKE.parity", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-code", type=Path, required=True,
                        help="your checkout of github.com/wxxv/MoMKE (copied, never changed)")
    parser.add_argument("--dataset", required=True, help="CMUMOSI, CMUMOSEI, IEMOCAPFour or "
                                                         "IEMOCAPSix")
    parser.add_argument("--data-root", default="features/synthetic",
                        help="a data root in the GCNet layout, real or synthetic (default: "
                             "features/synthetic)")
    parser.add_argument("--test-condition", default="a,t,v,atv",
                        help="comma list of fixed conditions (default: a,t,v,atv)")
    parser.add_argument("--seeds", default="66,67,68", help="comma list (default: 66,67,68)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where logs, our runs and the table go (default: parity/<dataset>)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both codes (default "
                                                        "cpu)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs of each code at once (default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per run, both codes (default: the cores / --jobs)")
    parser.add_argument("--folds", default=None,
                        help="IEMOCAP: comma list of folds to compare (default: all five). The "
                             "official code runs its folds in order and is stopped once the "
                             "last one listed is done, so --folds 1 costs one fold of it")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs the official code (default: this one)")
    for name in SHARED_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", default=None,
                            help=f"{name.replace('_', ' ')} of both codes (default: the paper's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_console_logging()
    args = build_parser().parse_args(argv)
    out = args.out or Path("parity") / args.dataset
    try:
        config, seeds = _ours_config(args, out)
        checkout = official.check_checkout(args.official_code)
        official.check_dependencies(checkout.path, args.python)
        official.check_data(Path(config.data_root), config.dataset, _features(config))
    except (ConfigError, DataError, official.OfficialError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    threads = args.threads or max(1, _cores() // max(1, args.jobs))
    started = time.perf_counter()
    try:
        theirs = run_official(checkout, config, seeds, out / "official", args.jobs, threads,
                              args.device, args.python)
    except official.OfficialError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    official_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for extra in (["--official"], []):
        code = sweep.main(_sweep_argv(config, seeds, args, threads) + extra)
        if code != 0:
            print(f"error: our sweep {' '.join(extra) or '(defaults)'} exited with {code}; see "
                  f"its log above.", file=sys.stderr)
            return code
    ours_seconds = time.perf_counter() - started
    results = [r for r in collect([Path(config.output_dir) / config.dataset]).results
               if r["setting"].startswith("fixed-") and r["seed"] in seeds
               and r["condition"] in config.test_condition]
    text, rows = tables(config, seeds, checkout, theirs, results,
                        {"official": official_seconds, "ours": ours_seconds}, _command(argv))
    (out / "parity.md").write_text(text)
    (out / "parity.csv").write_text(rows)
    print(text)
    print(f"written: {out / 'parity.md'}, {out / 'parity.csv'}")
    return 0


def _command(argv: Sequence[str] | None) -> str:
    return "python -m MoMKE.parity " + " ".join(sys.argv[1:] if argv is None else argv)


def _cores() -> int:
    from MoMKE.experiments.pool import available_cores
    return available_cores()


def _features(config: TrainConfig) -> dict[str, str]:
    return feature_names_from(config.audio_feature, config.text_feature, config.video_feature)


def _ours_config(args: argparse.Namespace, out: Path) -> tuple[TrainConfig, list[int]]:
    flags = ["--dataset", args.dataset, "--data-root", args.data_root, "--test-condition",
             args.test_condition, "--output-dir", str(out / "ours"), "--device", args.device]
    if args.folds is not None:
        flags += ["--folds", args.folds]
    for name in SHARED_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", value]
    config = parse_config(flags)
    try:
        seeds = [int(s) for s in args.seeds.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r} must be integers, e.g. 66,67,68.") from None
    if not seeds:
        raise ConfigError("--seeds is empty; give at least one seed.")
    return config, seeds


def _sweep_argv(config: TrainConfig, seeds: list[int], args: argparse.Namespace,
                threads: int) -> list[str]:
    argv = ["--dataset", config.dataset, "--data-root", config.data_root, "--output-dir",
            config.output_dir, "--test-condition", ",".join(config.test_condition),
            "--seeds", ",".join(map(str, seeds)), "--device", args.device,
            "--jobs", str(args.jobs), "--threads", str(threads)]
    if config.folds:
        argv += ["--folds", ",".join(map(str, config.folds))]
    for name in SHARED_FLAGS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    return argv


# ----------------------------------------------------------------------------- the official runs

def run_official(checkout: official.OfficialCheckout, config: TrainConfig, seeds: list[int],
                 folder: Path, jobs: int, threads: int, device: str,
                 python: str) -> dict[tuple[str, int], dict]:
    """Every (condition, seed) of the official code, `jobs` at once; each run's parsed log is
    kept as `<condition>_seed<seed>.json` beside its log and reused when its command is the same."""
    folder.mkdir(parents=True, exist_ok=True)
    regression = get_spec(config.dataset).is_regression
    todo = [(c, s) for c in config.test_condition for s in seeds]
    done: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="momke-official-") as workdir:
        copy = official.prepare(checkout, Path(workdir), Path(config.data_root))

        def one(condition: str, seed: int) -> dict:
            argv = official.command(
                dataset=config.dataset, condition=condition, seed=seed, epochs=config.epochs,
                stage_epochs=config.stage_epochs, batch_size=config.batch_size, lr=config.lr,
                l2=config.l2, hidden=config.hidden, depth=config.depth,
                num_heads=config.num_heads, drop_rate=config.drop_rate,
                attn_drop_rate=config.attn_drop_rate, feature_names=_features(config),
                device=device, python=python)
            saved = folder / f"{condition}_seed{seed}.json"
            key = {"argv": argv[1:], "commit": checkout.commit, "threads": threads,
                   "data": str(Path(config.data_root).resolve()), "folds": config.folds}
            if saved.is_file():
                kept = json.loads(saved.read_text())
                if kept.get("key") == key:
                    log.info("official %s seed %d: kept from %s", condition, seed, saved)
                    return kept
            log.info("official %s seed %d: running (%d thread(s))", condition, seed, threads)
            result = official.run(copy, argv, folder / f"{condition}_seed{seed}.log",
                                  regression=regression, stage_epochs=config.stage_epochs,
                                  threads=threads, stop_after_folds=max(config.folds or [0])
                                  or None)
            kept = [f for f in result.folds if not config.folds or f.fold in config.folds]
            reported = {k: float(np.mean([f.reported[k] for f in kept])) for k in kept[0].reported}
            record = {"key": key, "folds": [asdict(f) for f in kept],
                      "reported": reported, "wall_seconds": result.wall_seconds,
                      "cpu_seconds": result.cpu_seconds, "peak_rss_mb": result.peak_rss_mb}
            saved.write_text(json.dumps(record, indent=1))
            log.info("official %s seed %d: done in %.0f s", condition, seed, result.wall_seconds)
            return json.loads(saved.read_text())  # epochs as string keys, as when kept

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {item: pool.submit(one, *item) for item in todo}
            for item, future in futures.items():
                done[item] = future.result()
    return done


# ----------------------------------------------------------------------------- the tables

def _ours_values(results: list[dict], condition: str, official_mode: bool, rule: str,
                 metric: str) -> dict[int, float]:
    return {r["seed"]: float(r["test"][rule][metric]) for r in results
            if r["condition"] == condition and bool(r["config"].get("official")) == official_mode
            and r["test"][rule] is not None and r["test"][rule].get(metric) is not None}


def _official_last(record: dict, metric: str, epoch: int) -> float:
    """The official test metric at `epoch` (the last), mean over folds."""
    return float(np.mean([fold["test"][str(epoch)][metric] for fold in record["folds"]]))


def _ours_peak_mb(result: dict) -> float | None:
    """A run's peak memory, from its epochs.jsonl."""
    try:
        lines = (Path(result["folder"]) / "epochs.jsonl").read_text().splitlines()
        return max(json.loads(line)["peak_memory_mb"] for line in lines if line.strip())
    except (OSError, ValueError, KeyError):
        return None


def tables(config: TrainConfig, seeds: list[int], checkout: official.OfficialCheckout,
           theirs: dict[tuple[str, int], dict], ours: list[dict], seconds: dict[str, float],
           command: str) -> tuple[str, str]:
    """parity.md and parity.csv."""
    spec = get_spec(config.dataset)
    task = spec.task
    source = "SYNTHETIC" if ours and ours[0]["data_source"] == "synthetic" else "real"
    md = [f"# {config.dataset}: the official MoMKE code beside this one ({source} data)", ""]
    if source == "SYNTHETIC":
        md += ["**SYNTHETIC DATA**: this compares two implementations on generated features; it "
               "says nothing of MoMKE's accuracy on real data.", ""]
    md += [f"- Command: `{command}`",
           f"- Official code: {checkout.path} at commit `{checkout.commit}`, run from a copy whose "
           f"config.py points at the data (its method unchanged).",
           f"- Schedule (both codes): {config.epochs} epochs, {config.stage_epochs} of stage 1, "
           f"batch {config.batch_size}, lr {config.lr:g}, l2 {config.l2:g}, hidden "
           f"{config.hidden}, depth {config.depth}, heads {config.num_heads}, dropout "
           f"{config.drop_rate:g}; seeds {', '.join(map(str, seeds))}"
           + (f"; folds {', '.join(map(str, config.folds))} (the official code was stopped "
              f"after fold {max(config.folds)})" if config.folds else
              "; all five session folds" if spec.session_folds else "") + ".",
           "- Test split. Official: the epoch it reports (best on test among all epochs, stage 1 "
           "included, the hand-over a no-op). Ours `--official`: the same choices "
           "(`--select-from all --expert-handover last`). Ours by default: best on test among "
           "stage-2 epochs, each expert handed over at its best stage-1 epoch. MAE and Corr are "
           "on non-zero labels in every column (the official code's definition)."
           if task == "regression" else
           "- Test split, mean over folds. Official: the epoch it reports (best WA on test among "
           "all epochs, stage 1 included, the hand-over a no-op). Ours `--official`: the same "
           "choices. Ours by default: best on test among stage-2 epochs, each expert handed over "
           "at its best stage-1 epoch.",
           f"- A cell is mean ± sample std over seeds, accuracy-like metrics in %. Δ = ours "
           f"`--official` − official, with Welch's 95 % interval over seeds (two codes share no "
           f"random stream, so seeds are not paired) and the verdict within ±"
           f"{equivalence.MARGINS['percent']:g} point or ±{equivalence.MARGINS['raw']:g} "
           f"(MoMKE/results/equivalence.py): equivalent, different, or undecided (more seeds would "
           f"decide).", ""]
    csv_out = io.StringIO()
    writer = csv.writer(csv_out)
    writer.writerow(["dataset", "data_source", "rule", "condition", "metric", "unit",
                     "official_mean", "official_std", "ours_official_mean", "ours_official_std",
                     "ours_default_mean", "ours_default_std", "n_official", "n_ours",
                     "difference", "ci_low", "ci_high", "verdict"])
    verdicts: dict[str, int] = {}
    for rule, metrics, title in (
            ("best_test", REPORTED[task], "The reported number (best-on-test epoch)"),
            ("last", LAST[task], "The last epoch (no selection: the training itself)")):
        header = ["condition", "metric", "official", "ours --official", "ours default",
                  "Δ (ours --official − official)"]
        lines = []
        for condition in [c for c in CONDITIONS if c in config.test_condition]:
            for metric in metrics:
                scale = 100.0 if metric in equivalence.PERCENT_METRICS else 1.0
                official_values = [scale * (theirs[condition, s]["reported"][metric]
                                            if rule == "best_test" else
                                            _official_last(theirs[condition, s], metric,
                                                           config.epochs))
                                   for s in seeds if (condition, s) in theirs]
                mine = _ours_values(ours, condition, True, rule, metric)
                default = _ours_values(ours, condition, False, rule, metric)
                mine_values = [scale * v for v in mine.values()]
                default_values = [scale * v for v in default.values()]
                comparison = equivalence.welch(official_values, mine_values,
                                               equivalence.margin_of(metric))
                verdicts[comparison.verdict] = verdicts.get(comparison.verdict, 0) + 1
                lines.append([condition, NAMES.get(metric, metric), _fmt(official_values, metric),
                              _fmt(mine_values, metric), _fmt(default_values, metric),
                              equivalence.describe(comparison, metric)])
                writer.writerow([config.dataset, source.lower(), rule, condition, metric,
                                 "percent" if scale == 100 else "raw",
                                 *_stats(official_values), *_stats(mine_values),
                                 *_stats(default_values), len(official_values),
                                 len(mine_values), f"{comparison.difference:.4f}",
                                 f"{comparison.low:.4f}", f"{comparison.high:.4f}",
                                 comparison.verdict])
        md += [f"## {title}", ""] + _table(header, lines) + [""]
    md += ["Verdicts: " + ", ".join(f"{verdicts.get(v, 0)} {v}" for v in
                                    ("equivalent", "undecided", "different")) + ".", ""]
    md += _cost_lines(theirs, ours, seconds)
    md += _selection_lines(config, seeds, theirs, ours)
    return "\n".join(md) + "\n", csv_out.getvalue()


def _stats(values: list[float]) -> list[str]:
    if not values:
        return ["", ""]
    return [f"{np.mean(values):.4f}", f"{np.std(values, ddof=1):.4f}" if len(values) > 1 else ""]


def _fmt(values: list[float], metric: str) -> str:
    if not values:
        return "n/a"
    digits = 2 if metric in equivalence.PERCENT_METRICS else 3
    text = f"{np.mean(values):.{digits}f}"
    return text + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in lines])


def _cost_lines(theirs: dict, ours: list[dict], seconds: dict[str, float]) -> list[str]:
    walls = [r["wall_seconds"] for r in theirs.values()]
    cpus = [r["cpu_seconds"] for r in theirs.values()]
    peaks = [r["peak_rss_mb"] for r in theirs.values()]
    mine = [r["seconds"]["total"] for r in ours if "seconds" in r]
    ours_peaks = [p for p in map(_ours_peak_mb, ours) if p is not None]
    row = lambda name, n, wall, cpu, peak, total: (  # noqa: E731
        f"| {name} | {n} | {wall} | {cpu} | {peak} | {total:.0f} |")
    return ["## What each code cost", "",
            "| code | runs | wall per run, mean (s) | CPU per run, mean (s) | peak resident "
            "memory (MB) | this harness, wall (s) |", "|---|---|---|---|---|---|",
            row("official", len(walls), f"{np.mean(walls):.0f}" if walls else "",
                f"{np.mean(cpus):.0f}" if cpus else "", f"{max(peaks):.0f}" if peaks else "",
                seconds["official"]),
            row("ours, `--official` and default", len(mine), f"{np.mean(mine):.0f}" if mine
                else "", "", f"{max(ours_peaks):.0f}" if ours_peaks else "", seconds["ours"]),
            "", "The official code trains stage 1 in every run and its wall time is its whole "
            "process, data loading included. Ours trains stage 1 once per seed for the default "
            "runs and reuses it (result.json `seconds`, the training only); with `--official` "
            "each run trains its own, as the selection pool needs its stage-1 test passes.", ""]


def _selection_lines(config: TrainConfig, seeds: list[int], theirs: dict,
                     ours: list[dict]) -> list[str]:
    """For condition v (or the first condition run): which epoch each rule picks, per seed."""
    condition = "v" if "v" in config.test_condition else config.test_condition[0]
    task = get_spec(config.dataset).task
    metric = "f1" if task == "regression" else "wa"
    shown = NAMES[metric]
    lines = [f"## Which epoch is reported: condition {condition}, per seed and fold", "",
             f"Epochs numbered from 1; stage 1 is epochs 1-{config.stage_epochs}. The test "
             f"{shown} at the chosen epoch. With stage-1 epochs in the pool, a weak condition can "
             f"report an epoch whose fused pass saw modalities that the condition removes (stage "
             f"1 trains and tests on complete data).", "",
             "| seed | fold | official: epoch (stage) | official " + shown + " | ours --official:"
             " epoch (stage) | ours --official " + shown + " | ours default best-on-test: epoch"
             " | ours default " + shown + " |" +
             (" ours default best-on-validation: epoch | its test " + shown + " |"
              if task == "regression" else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if task == "regression" else "")]
    stage = lambda epoch: 1 if epoch <= config.stage_epochs else 2  # noqa: E731
    for seed in seeds:
        record = theirs.get((condition, seed))
        mine = next((r for r in ours if r["condition"] == condition and r["seed"] == seed
                     and r["config"].get("official")), None)
        default = next((r for r in ours if r["condition"] == condition and r["seed"] == seed
                        and not r["config"].get("official")), None)
        folds = record["folds"] if record else []
        for k, fold in enumerate(folds):
            epoch = fold["reported_epoch"]
            cells = [str(seed), str(fold["fold"]), f"{epoch} ({stage(epoch)})",
                     f"{100 * fold['reported'][metric]:.2f}"]
            for result, rules in ((mine, ("best_test",)), (default, ("best_test", "best_val")
                                                          if task == "regression" else
                                                          ("best_test",))):
                for rule in rules:
                    if result is None or k >= len(result["folds"]) or \
                            result["folds"][k]["test"][rule] is None:
                        cells += ["n/a", "n/a"]
                        continue
                    ours_fold = result["folds"][k]
                    chosen = ours_fold["epoch"][rule]
                    label = f"{chosen} ({ours_fold['stage'][rule]})" if result is mine else \
                        str(chosen)
                    cells += [label, f"{100 * ours_fold['test'][rule][metric]:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
