"""The authors' MoMKE code (github.com/wxxv/MoMKE), run beside this project on the same data.

Used by the parity harness (docs/differences.md) and the benchmark (README.md, Runtime).
Nothing of the official code is part of this project: the user gives the path of their own
checkout; it is copied to a temporary folder whose `config.py` gets the data, log and model paths
appended (the lines that set them, nothing of the method), and run with its own command line.
Its console log is read as it is printed, each line time-stamped on arrival, so the seconds of
every epoch are known even though the code prints none.

    check_checkout(path)               a MoMKE checkout, or OfficialError in one sentence
    missing_dependencies(path, python) third-party modules its code imports that `python` lacks
    check_data(root, dataset, names)   the label file and feature folders it reads
    prepare(checkout, into, root)      the temporary copy, pointed at the data
    command(...)                       its command line for one condition and seed
    run(workdir, argv, log, ...)       run it; an `OfficialRun` with what its log says
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from dataloader.datasets import MODALITIES, get_spec

TRAIN_SCRIPT = "MoMKE/train_MoMKE.py"
MARKERS = (TRAIN_SCRIPT, "MoMKE/model_expert_softmoe.py", "config.py")
DATASET_KEYS = ("CMUMOSI", "CMUMOSEI", "IEMOCAPSix", "IEMOCAPFour")  # the keys of its config


class OfficialError(ValueError):
    """The official code cannot be run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class OfficialCheckout:
    path: Path
    commit: str  # git commit of the checkout, or "unknown" (a copy without .git)


def check_checkout(path: str | Path) -> OfficialCheckout:
    """`path` as a checkout of the official MoMKE repository, or OfficialError."""
    path = Path(path)
    if not path.is_dir():
        raise OfficialError(f"--official-code {path}: no such folder; clone the official code "
                            f"(git clone https://github.com/wxxv/MoMKE) and pass its path.")
    missing = [name for name in MARKERS if not (path / name).is_file()]
    config = path / "config.py"
    if missing or not all(word in config.read_text(errors="replace")
                          for word in ("PATH_TO_FEATURES", "PATH_TO_LABEL", "LOG_DIR")):
        raise OfficialError(f"--official-code {path}: not a checkout of the official MoMKE code "
                            f"(it lacks {', '.join(missing) or 'the paths of config.py'}); pass "
                            f"the folder of `git clone https://github.com/wxxv/MoMKE`.")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return OfficialCheckout(path, commit)


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the third-party modules the checkout's code imports (not the standard
    library, not its own modules)."""
    sources = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
    own = {p.stem for p in sources} | {p.name for p in path.rglob("*") if p.is_dir()}
    names: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in own and n not in sys.stdlib_module_names}


def missing_dependencies(path: Path, python: str = sys.executable) -> list[str]:
    """The modules of `imported_modules` that `python` cannot import."""
    names = sorted(imported_modules(path))
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] " \
            "if importlib.util.find_spec(m) is None))"
    done = subprocess.run([python, "-c", probe, *names], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise OfficialError(f"--python {python}: cannot run ({done.stderr.strip()[-300:]}).")
    return done.stdout.split()


def check_dependencies(path: Path, python: str = sys.executable) -> None:
    missing = missing_dependencies(path, python)
    if missing:
        names = {"sklearn": "scikit-learn"}
        raise OfficialError(
            f"the official code imports {', '.join(missing)}, which {python} lacks; install "
            f"{'it' if len(missing) == 1 else 'them'} with `{python} -m pip install "
            f"{' '.join(names.get(m, m) for m in missing)}` (they are not this project's "
            f"dependencies).")


def check_data(data_root: Path, dataset: str, feature_names: dict[str, str]) -> None:
    """The label file and the three feature folders the official code reads for `dataset`."""
    spec = get_spec(dataset)
    folder = data_root / spec.folder
    needed = [folder / spec.label_file] + [folder / "features" / feature_names[m]
                                           for m in MODALITIES]
    absent = [p for p in needed if not p.exists()]
    if absent:
        raise OfficialError(f"{absent[0]}: the official code reads it for {dataset}, but it is "
                            f"not there; point --data-root at a dataset in the GCNet layout "
                            f"(python -m dataloader.synthetic writes one).")


def prepare(checkout: OfficialCheckout, into: Path, data_root: Path) -> Path:
    """A copy of the checkout in `into`, its config.py pointed at `data_root` and at `into`
    for logs and models (appended lines; nothing of the method changes). Returns the copy."""
    copy = into / "official"
    shutil.copytree(checkout.path, copy, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "saved", "*.pyc", "*.pth"))
    data_root = data_root.resolve()
    features = {key: str(data_root / get_spec(key).folder / "features") for key in DATASET_KEYS}
    labels = {key: str(data_root / get_spec(key).folder / get_spec(key).label_file)
              for key in DATASET_KEYS}
    saved = (into / "official-saved").resolve()
    with (copy / "config.py").open("a") as handle:
        handle.write(
            "\n\n# --- appended by `python -m MoMKE.parity` (the MoMKE reproduction): data, log and"
            "\n# model paths for this comparison; the code above is the checkout's, unchanged.\n"
            f"PATH_TO_FEATURES = {json.dumps(features)}\n"
            f"PATH_TO_LABEL = {json.dumps(labels)}\n"
            f"SAVED_ROOT = {json.dumps(str(saved))}\n"
            "LOG_DIR = os.path.join(SAVED_ROOT, 'log')\n"
            "MODEL_DIR = os.path.join(SAVED_ROOT, 'model')\n"
            "NPZ_DIR = os.path.join(SAVED_ROOT, 'npz')\n")
    return copy


def command(*, dataset: str, condition: str, seed: int, epochs: int, stage_epochs: int,
            batch_size: int, lr: float, l2: float, hidden: int, depth: int, num_heads: int,
            drop_rate: float, attn_drop_rate: float, feature_names: dict[str, str],
            device: str = "cpu", python: str = sys.executable) -> list[str]:
    """The official command line (its run scripts' flags) for one condition and seed."""
    argv = [python, "-u", TRAIN_SCRIPT, f"--dataset={dataset}",
            f"--audio-feature={feature_names['a']}", f"--text-feature={feature_names['t']}",
            f"--video-feature={feature_names['v']}", f"--seed={seed}",
            f"--batch-size={batch_size}", f"--epochs={epochs}", f"--lr={lr}", f"--l2={l2}",
            f"--hidden={hidden}", f"--depth={depth}", f"--num_heads={num_heads}",
            f"--drop_rate={drop_rate}", f"--attn_drop_rate={attn_drop_rate}",
            f"--test_condition={condition}", f"--stage_epoch={stage_epochs}"]
    if not device.startswith("cuda"):
        return argv + ["--no-cuda"]
    _, _, index = device.partition(":")  # the GPU our runs use: cuda:N (cuda: the first)
    return argv + [f"--gpu={index or 0}"]


# ----------------------------------------------------------------------------- its log

@dataclass
class OfficialFold:
    """What the official log says about one fold. Epochs are numbered from 1 here (the log
    counts from 0)."""

    fold: int
    epoch_seconds: list[tuple[int, int, float]] = field(default_factory=list)  # (stage, epoch, s)
    test: dict[int, dict[str, float]] = field(default_factory=dict)  # stage-2 epoch -> metrics
    handover: dict[str, int] = field(default_factory=dict)  # its "best" stage-1 epoch per expert
    reported_epoch: int | None = None  # the best-on-test epoch it reports (stage 1 included)
    reported: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class OfficialRun:
    folds: list[OfficialFold]
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    returncode: int
    log: Path
    stage_epochs: int


_NUMBER = r"(-?[\d.]+(?:e-?\d+)?|nan|-?inf)"
_STAGE1 = re.compile(r"^epoch:(\d+); a_acc_train:([\d.]+); t_acc_train:([\d.]+); "
                     r"v_acc_train:([\d.]+)$")
_STAGE2 = re.compile(rf"^epoch:(\d+); test_mae_\w+:{_NUMBER}; test_corr_\w+:{_NUMBER}; "
                     rf"test_fscore_\w+:{_NUMBER}%; test_acc_\w+:{_NUMBER}%; test_loss")
_FOLD = re.compile(r"^>>>>> Cross-validation: training on the (\d+) folder >>>>>$")
_HANDOVER = re.compile(r"^best_epoch_([atv]): (\d+)$")
_STAGE_TIME = re.compile(r"^Time of (first|second) stage: ([\d.]+)s$")
_BEST_CMU = re.compile(rf"^The best\(acc\) epoch of test_condition \(\w+\): (\d+) --test_mae "
                       rf"{_NUMBER} --test_corr {_NUMBER} --test_fscores {_NUMBER} --test_acc "
                       rf"{_NUMBER}\.$")
_BEST_IEMOCAP = re.compile(rf"^The best\(acc\) epoch of test_condition \(\w+\): (\d+) --test_acc "
                           rf"{_NUMBER} --test_ua {_NUMBER}\.$")


def parse_log(lines: Iterable[tuple[float, str]], regression: bool) -> list[OfficialFold]:
    """The folds of an official log given as (arrival time, line) pairs. An epoch's seconds are
    the time between its line and the previous epoch's (or the fold's start)."""
    folds: list[OfficialFold] = []
    last_mark = None
    for moment, raw in lines:
        line = raw.strip()
        if match := _FOLD.match(line):
            folds.append(OfficialFold(int(match[1])))
            last_mark = moment
        elif not folds:
            continue
        elif match := _STAGE1.match(line):
            epoch = int(match[1]) + 1
            folds[-1].epoch_seconds.append((1, epoch, moment - last_mark))
            last_mark = moment
        elif match := _STAGE2.match(line):
            epoch = int(match[1]) + 1
            mae, corr, f1, acc = (float(v) for v in match.groups()[1:])
            folds[-1].test[epoch] = _named(regression, mae, corr, f1 / 100, acc / 100)
            folds[-1].epoch_seconds.append((2, epoch, moment - last_mark))
            last_mark = moment
        elif match := _HANDOVER.match(line):
            folds[-1].handover[match[1]] = int(match[2]) + 1
        elif match := _STAGE_TIME.match(line):
            folds[-1].stage_seconds[match[1]] = float(match[2])
        elif match := _BEST_CMU.match(line):
            mae, corr, f1, acc = (float(v) for v in match.groups()[1:])
            folds[-1].reported_epoch = int(match[1]) + 1
            folds[-1].reported = _named(True, mae, corr, f1, acc)
        elif match := _BEST_IEMOCAP.match(line):
            acc, ua = float(match[2]), float(match[3])
            folds[-1].reported_epoch = int(match[1]) + 1
            folds[-1].reported = {"wa": acc, "ua": ua}
    return folds


def _named(regression: bool, mae: float, corr: float, f1: float, acc: float) -> dict[str, float]:
    """The official metrics under this project's names: for CMU its MAE and Corr are on non-zero
    labels; for IEMOCAP its `corr` slot carries UA and its MAE is a placeholder 0."""
    if regression:
        return {"acc2": acc, "f1": f1, "mae_nonzero": mae, "corr_nonzero": corr}
    return {"wa": acc, "ua": corr, "f1": f1}


def run(workdir: Path, argv: Sequence[str], log: Path, *, regression: bool, stage_epochs: int,
        threads: int = 1, stop_after_folds: int | None = None,
        timeout: float | None = None) -> OfficialRun:
    """Run the official command `argv` in `workdir` with `threads` CPU threads, its console
    written to `log` line by line with the arrival time; stop it once `stop_after_folds` folds
    are done (the benchmark needs one). Wall time, CPU time and peak memory are the process's."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timed: list[tuple[float, str]] = []
    process = subprocess.Popen(list(argv), cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    stopped = False
    with log.open("w") as out:
        for line in process.stdout:
            moment = time.perf_counter() - started
            timed.append((moment, line))
            out.write(f"[{moment:9.2f}s] {line}")
            if stop_after_folds and line.startswith(">>>>> Finish: training on the") and \
                    sum(l.startswith(">>>>> Finish") for _, l in timed) >= stop_after_folds:
                process.kill()
                stopped = True
                break
            if timeout is not None and moment > timeout:
                process.kill()
                raise OfficialError(f"the official run {' '.join(argv[2:])} took longer than "
                                    f"{timeout:.0f} s; see its log {log}.")
    _, status, usage = os.wait4(process.pid, 0)
    code = 0 if stopped else os.waitstatus_to_exitcode(status)
    process.returncode = code
    scale = 1 if sys.platform == "darwin" else 1024
    result = OfficialRun(parse_log(timed, regression), time.perf_counter() - started,
                         usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale / 2**20, code,
                         log, stage_epochs)
    if code != 0:
        tail = "".join(line for _, line in timed[-5:]).strip()
        raise OfficialError(f"the official run exited with code {code}: {tail[-400:]} (log: "
                            f"{log}).")
    return result
