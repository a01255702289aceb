"""Run every (seed, condition or rate) of a dataset as one resumable list of runs.

    python -m MoMKE.sweep --dataset CMUMOSI --test-condition a,t,v,at,av,tv,atv \
        --missing-rate 0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7 --seeds 66,67,68 [MoMKE.train flags]

The sweep plans a list of runs (one per seed and condition or rate), skips those
whose run folder holds a complete result, and runs the rest; a run interrupted half-way has no
`result.json` and is trained again from its start. Runs that share a stage 1 (every fixed
condition of a seed; each rate of a seed) are planned next to each other, so the first trains it
and the others reuse it from `<output-dir>/_stage1/`. The list runs on this machine, several runs
at once in worker processes (`--launcher local --jobs K`, `MoMKE/experiments/pool.py`; `--jobs 1`: one after
another in this process), or as Ray tasks (`--launcher ray`, `MoMKE/experiments/ray_executor.py`), with the same
files; numbers agree to the bit at equal `--threads`. The run scripts call this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import torch

from dataloader.datasets import DataError, get_spec
from dataloader.gcnet import data_fingerprint, feature_names_from, load_dataset
from dataloader.synthetic import generate
from MoMKE import runner
from MoMKE.config import ABLATIONS, ConfigError, TrainConfig, check_seed, parse_config
from MoMKE.experiments import evaluate
from MoMKE.experiments.plan import (RunSpec, SweepSummary, file_locked, pending_runs,
                                    wait_for_others)
from MoMKE.experiments.pool import (available_cores, default_jobs, probe_cuda_peak, run_in_pool,
                                    worker_gpus)
from MoMKE.experiments.ray_executor import import_ray, run_on_ray
from MoMKE.protocols import settings_from
from MoMKE.results import report
from MoMKE.runlog import check_output_dir, setup_console_logging
from MoMKE.runtime import resolve_device

log = logging.getLogger("MoMKE")

SYNTHETIC_ROOT = "synthetic"  # below the data root: features/synthetic/


def plan(config: TrainConfig, seeds: Sequence[int], *, unified: str | None = None,
         ablations: Sequence[str] = ()) -> list[RunSpec]:
    """Every (seed, variant, setting) as its own config: MoMKE on each condition and rate, each
    ablation on the same, and optionally one unified model per seed. Runs sharing a stage 1 stay
    next to each other, so the first trains it and the others reuse it."""
    fingerprint = data_fingerprint(config.dataset, config.data_root, feature_names_from(
        config.audio_feature, config.text_feature, config.video_feature))
    variants = [dataclasses.replace(config, ablation="none")]
    variants += [dataclasses.replace(config, ablation=name) for name in ablations]
    runs = []
    for seed in seeds:
        for variant in variants:
            for setting in settings_from(variant.test_condition, variant.missing_rate):
                single = dataclasses.replace(
                    variant, seed=seed, train_missing="run",
                    test_condition=[setting.condition] if setting.protocol == "fixed" else [],
                    missing_rate=[setting.rate] if setting.protocol == "random" else [])
                runs.append(RunSpec(single, setting, fingerprint))
        if unified:
            single = dataclasses.replace(config, seed=seed, ablation="none", train_missing=unified)
            runs.append(RunSpec(single, settings_from([], [], unified)[0], fingerprint))
    return _once_each(runs)


def _once_each(runs: list[RunSpec]) -> list[RunSpec]:
    """The runs without repeats (a seed, condition, rate or ablation listed twice is one run
    folder), with a note: trained twice, a run would also count twice in the summary."""
    unique: dict[Path, RunSpec] = {}
    repeated = []
    for run in runs:
        if run.folder in unique:
            repeated.append(run.label)
        else:
            unique[run.folder] = run
    if repeated:
        log.warning("sweep: %s listed more than once (by --seeds, --test-condition, "
                    "--missing-rate or --ablations); planned once", ", ".join(dict.fromkeys(
                        repeated)))
    return list(unique.values())


def run_locally(runs: Sequence[RunSpec]) -> SweepSummary:
    """The in-process executor: one run after another, the dataset loaded once."""
    summary, pending = SweepSummary.begin(runs)
    if not pending:
        return summary
    first = pending[0].config
    data = load_dataset(first.dataset, first.data_root, feature_names_from(
        first.audio_feature, first.text_feature, first.video_feature))
    device = resolve_device(first.device)
    for number, run in enumerate(pending, start=1):
        log.info("[%d/%d] %s", number, len(pending), run.label)
        try:
            runner.run(run.config, data, run.setting, device)
            summary.trained.append(run)
        except runner.STATED_FAILURES as error:  # said in one sentence; the sweep goes on
            if not file_locked(summary, run, error):
                log.error("%s failed: %s", run.label, error)
                summary.fail(run, f"{type(error).__name__}: {error}", error)
        except Exception as error:  # unexpected: with its traceback; the sweep goes on
            log.error("%s failed: %s\n%s", run.label, error, traceback.format_exc())
            summary.fail(run, f"{type(error).__name__}: {error}", error)
    wait_for_others(summary, run_locally)
    return summary


def resolve_data_root(config: TrainConfig, synthetic_fallback: bool) -> TrainConfig:
    """Real features when present; otherwise, with the fallback, the synthetic set (generated
    once into <data root>/synthetic/), announced loudly."""
    spec = get_spec(config.dataset)
    if (Path(config.data_root) / spec.folder / spec.label_file).is_file() or not synthetic_fallback:
        return config
    root = Path(config.data_root) / SYNTHETIC_ROOT
    banner = "#" * 78
    log.warning("%s\n# No %s features under %s: using the SYNTHETIC default in %s.\n# Every number "
                "of this sweep is measured on generated data, NOT comparable with the paper.\n%s",
                banner, spec.name, config.data_root, root, banner)
    if not (root / spec.folder / spec.label_file).is_file():
        log.info("generating the synthetic %s set (python -m dataloader.synthetic --dataset %s "
                 "--out %s)", spec.name, spec.name, root)
        generate(spec.name, root)
    return dataclasses.replace(config, data_root=str(root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m MoMKE.sweep", allow_abbrev=False,
        description="Run every (seed, condition or rate) as one resumable list of runs; any "
                    "other flag is a MoMKE.train flag (see python -m MoMKE.train --help).")
    parser.add_argument("--seeds", default=None,
                        help="comma or space separated seeds (default: the --seed of the run, 66)")
    parser.add_argument("--unified", choices=["none", "any", "any+rates"], default="none",
                        help="also train one unified model per seed (see MoMKE.train "
                             "--train-missing); default none")
    parser.add_argument("--ablations", default="",
                        help=f"comma list of ablations to run beside MoMKE on every condition "
                             f"and rate: {', '.join(ABLATIONS)}, or all")
    parser.add_argument("--synthetic-fallback", action="store_true",
                        help="without real features under --data-root, generate and use the "
                             "synthetic set in <data-root>/synthetic (the run scripts set this)")
    parser.add_argument("--report", action="store_true",
                        help="write and print the tables of <output-dir>/<dataset> when the "
                             "runs are done (python -m MoMKE.report; the run scripts set this)")
    parser.add_argument("--evaluate-all", action="store_true",
                        help="once the runs are trained, evaluate each under all seven conditions "
                             "and all eight rates on the test split (python -m MoMKE.evaluate), "
                             "for the report's robustness matrix")
    parser.add_argument("--ci", action=argparse.BooleanOptionalAction, default=False,
                        help="with --report: 95 %% bootstrap intervals and paired comparisons "
                             "in the tables (the run scripts set this; --no-ci drops them)")
    parser.add_argument("--launcher", choices=["local", "ray"], default="local",
                        help="local: the runs on this machine, --jobs at once (default); ray: "
                             "each run a Ray task, in parallel (needs requirements-ray.txt)")
    parser.add_argument("--jobs", default="auto",
                        help="with --launcher local: runs trained at once, each in its own "
                             "process pinned to its share of the cores (or sharing the GPU); "
                             "auto: one per core (per --threads cores when given) as far as half "
                             "of the memory holds them, on a GPU as far as half of its memory "
                             "holds them at one run's measured peak; 1: one run after another in "
                             "this process with all cores (default: auto)")
    parser.add_argument("--ray-address", default="local",
                        help="with --launcher ray: local (default: start a Ray instance on this "
                             "machine with its cores), auto (join the cluster `ray start` began "
                             "on this machine) or host:port of a cluster's head")
    parser.add_argument("--cpus-per-run", type=float, default=1.0,
                        help="with --launcher ray: CPUs each run asks for; also its torch "
                             "threads unless --threads is given (default: 1)")
    parser.add_argument("--gpus-per-run", type=float, default=0.0,
                        help="with --launcher ray: GPUs each run asks for, e.g. 1 on a GPU box, "
                             "0.25 for four runs per GPU; 0 hides the GPUs from the runs, so a "
                             "GPU --device is refused (default: 0)")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="with --launcher ray: times a run is retried when its worker process "
                             "or node dies; a run's own error is never retried (default: 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_console_logging()
    args, train_args = build_parser().parse_known_args(argv)
    runs: list[RunSpec] = []
    try:
        return _sweep(args, train_args, runs)
    except KeyboardInterrupt:
        # One line instead of a traceback: what is kept, and that the same command goes on.
        done = sum(run.is_complete() for run in runs)
        kept = f"{done} of {len(runs)} planned runs are complete" if runs else \
            "no run was planned yet"
        print(f"\ninterrupted: {kept}; run the same command again to continue (complete runs "
              f"are skipped).", file=sys.stderr)
        return 130


def _sweep(args: argparse.Namespace, train_args: list[str], runs: list[RunSpec]) -> int:
    """The sweep of `main`; fills `runs` as soon as they are planned."""
    try:
        config = parse_config(train_args)
        # What runs on this device (--amp dropped where it has no bfloat16), so the planned run
        # folders are the ones the runs write.
        config = runner.as_run_on(config, resolve_device(config.device))
        seeds = _seeds(args.seeds, config.seed)
        check_output_dir(config.output_dir, config.dataset)
        if args.launcher == "ray":
            import_ray()  # say how to install it before anything else happens
        config = resolve_data_root(config, args.synthetic_fallback)
        runs += plan(config, seeds, unified=None if args.unified == "none" else args.unified,
                     ablations=_ablations(args.ablations))
        check_output_dir(config.output_dir, config.dataset, len(pending_runs(runs)))
        jobs, threads = _jobs(args.jobs, config, runs) if args.launcher == "local" else (1, 0)
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("sweep: %d runs (%s)", len(runs), ", ".join(run.label for run in runs))
    started = time.perf_counter()
    try:
        if args.launcher == "ray":
            summary = run_on_ray(runs, address=args.ray_address, cpus_per_run=args.cpus_per_run,
                                 gpus_per_run=args.gpus_per_run, max_retries=args.max_retries)
        else:
            summary = run_in_pool(runs, jobs, threads) if jobs > 1 else run_locally(runs)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("%s", summary.report(time.perf_counter() - started))
    if args.evaluate_all:
        _evaluate_all(runs, resolve_device(config.device))
    if args.report:
        tables = report.main([str(Path(config.output_dir) / config.dataset),
                              *(["--ci"] if args.ci else [])])
        if tables != 0:
            return tables
    return 1 if summary.failed else 0


def _evaluate_all(runs: Sequence[RunSpec], device) -> None:
    """Every complete run of the sweep under every condition and rate (test split), kept in its
    evaluations.json; a run that cannot be evaluated is named and skipped."""
    started, loaded, count = time.perf_counter(), evaluate.Loaded(), 0
    settings = evaluate.requested_settings(None, None)
    for run in runs:
        if not run.is_complete():
            continue
        try:
            count += len(evaluate.evaluate_run(run.folder, settings, split="test",
                                               device=device, loaded=loaded))
        except (evaluate.Refused, ValueError) as error:
            log.warning("not evaluated: %s", error)
    log.info("evaluated: %d (run, setting) pairs in %.1f s (python -m MoMKE.evaluate)", count,
             time.perf_counter() - started)


def _jobs(text: str, config: TrainConfig, runs: Sequence[RunSpec]) -> tuple[int, int]:
    """(runs at once, torch threads of each) for the local launcher, said in the log."""
    pending = pending_runs(runs)
    if text == "auto":
        device = resolve_device(config.device)
        peak, gpus = None, 1
        if device.type == "cuda" and len(pending) > 1:
            data = load_dataset(config.dataset, config.data_root, feature_names_from(
                config.audio_feature, config.text_feature, config.video_feature))
            peak = probe_cuda_peak(config, data, device)
            gpus = len(worker_gpus(config.device, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                   torch.cuda.device_count()))
        jobs, why = default_jobs(config.dataset, device, config.threads, peak, gpus)
    else:
        try:
            jobs = int(text)
        except ValueError:
            jobs = 0
        if jobs < 1:
            raise ConfigError(f"--jobs {text!r} must be auto or a positive number of runs.")
        why = f"{jobs} run(s) at once (--jobs {jobs})"
    jobs = min(jobs, max(1, len(pending)))
    threads = config.threads or max(1, available_cores() // jobs)
    if jobs > 1:
        log.info("sweep: %s; %d torch thread(s) per run", why, threads)
    return jobs, threads


def _ablations(text: str) -> list[str]:
    names = [n for n in text.replace(" ", ",").split(",") if n]
    if names == ["all"]:
        return list(ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"--ablations {unknown[0]!r} is unknown; use {', '.join(ABLATIONS)} or "
                          f"all.")
    return names


def _seeds(text: str | None, default: int) -> list[int]:
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be integers, e.g. '66,67,68'.") from None
    if not seeds:
        raise ConfigError("--seeds is empty; give at least one seed.")
    for seed in seeds:
        check_seed(seed)
    unique = list(dict.fromkeys(seeds))
    if len(unique) < len(seeds):
        log.warning("--seeds %s lists %s more than once; each seed is planned once", text,
                    ", ".join(str(s) for s in unique if seeds.count(s) > 1))
    return unique


if __name__ == "__main__":
    sys.exit(main())
