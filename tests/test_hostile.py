"""Hostile inputs, round 2: what a filesystem and a user can give, answered in one
sentence, with the right number or none.

    1. data known by its content   a rewrite that keeps size and mtime is new data; a touch is not
    2. splits checked together     overlap, repeats, empty splits refused before any training
    3. filesystem faults           broken links, a full disk, read-only run folders
    4. sweeps that cooperate       a run another sweep trains, Ctrl-C, repeated seeds, a broken
                                   predictions.npz, the log of this attempt
Each failed on the code before the change.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dataloader import atomic
from dataloader.datasets import DEFAULT_FEATURES, DataError, get_spec
from dataloader.gcnet import data_fingerprint, load_dataset
from dataloader.labels import Fold, _check_fold, read_label_file
from MoMKE import trainer
from MoMKE.experiments import sweep
from MoMKE.results import report
from MoMKE.train import main
from tests.conftest import requires_shared_labels

PROJECT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "8", "--depth", "1", "--batch-size", "4", "--device", "cpu", "--seed", "5",
        "--epochs", "4"]
LABELS = "CMUMOSI_features_raw_2way.pkl"


@pytest.fixture
def mosi(tmp_path, tiny_root):
    """A private copy of the tiny CMU-MOSI set that a test may change."""
    shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "data" / "CMUMOSI",
                    ignore=shutil.ignore_patterns(".cache"))
    return tmp_path / "data"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_root):
    """An output folder with one complete run (fixed-atv, seed 5), trained once per module."""
    out = tmp_path_factory.mktemp("finished")
    assert _train(tiny_root, out) == 0
    return out


def _train(root, output, *extra) -> int:
    return main(["--dataset", "CMUMOSI", "--data-root", str(root), "--output-dir", str(output),
                 *TINY, *extra])


def _sweep(root, output, *extra) -> int:
    return sweep.main(["--dataset", "CMUMOSI", "--data-root", str(root), "--output-dir",
                       str(output), "--jobs", "1", *TINY, *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _a_feature_file(root: Path, modality: str = "t", k: int = 0) -> Path:
    return sorted((root / "CMUMOSI" / "features" / DEFAULT_FEATURES[modality]).glob("*.npy"))[k]


# ----------------------------------------------------------------------------- 1. content

def test_a_rewrite_that_keeps_size_and_mtime_is_new_data(mosi, tmp_path, capsys, caplog):
    assert _train(mosi, tmp_path / "out") == 0
    victim = _a_feature_file(mosi)
    before = victim.stat()
    np.save(victim, np.load(victim) + 1.0)  # what `cp -p` of a re-extraction does
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert victim.stat().st_size == before.st_size

    caplog.set_level("INFO")
    data = load_dataset("CMUMOSI", mosi)
    assert "stale" in caplog.text  # the cache is rebuilt from the new bytes
    row = list(data.utterance_ids).index(victim.stem)
    np.testing.assert_array_equal(data.features["t"][row], np.load(victim).reshape(-1))
    capsys.readouterr()
    assert _train(mosi, tmp_path / "out") == 0
    assert "complete already" not in capsys.readouterr().out
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/*/result.json")]
    assert len({r["identity"]["data"] for r in results}) == 2
    assert len({r["identity_hash"] for r in results}) == 2


def test_the_same_bytes_are_the_same_data_wherever_they_lie(mosi, tmp_path, caplog):
    first = data_fingerprint("CMUMOSI", mosi)
    victim = _a_feature_file(mosi)
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # touch
    caplog.set_level("INFO")
    assert load_dataset("CMUMOSI", mosi).fingerprint == first
    assert "stale" in caplog.text  # the quick check saw it, the content says: same data
    copy = tmp_path / "copy"
    shutil.copytree(mosi, copy)  # other inodes and times, same bytes
    assert data_fingerprint("CMUMOSI", copy) == first


# ----------------------------------------------------------------------------- 2. splits

def _rewrite_splits(root: Path, edit) -> Path:
    path = root / "CMUMOSI" / LABELS
    content = list(pickle.loads(path.read_bytes()))
    content[4:] = edit(*[sorted(s) for s in content[4:]])
    path.write_bytes(pickle.dumps(tuple(content)))
    return path


@pytest.mark.parametrize("edit, says", [
    (lambda tr, va, te: (tr + te[:1], va, te), "is in both the train and the test split"),
    (lambda tr, va, te: (tr + tr[:2], va, te), "the train split lists"),
    (lambda tr, va, te: (tr, va, []), "the test split is empty"),
    (lambda tr, va, te: ([], va, te), "the train split is empty"),
    (lambda tr, va, te: (tr, va + tr[:5], te), "are in both the train and the val split"),
], ids=["overlap", "repeat", "empty-test", "empty-train", "five-shared"])
def test_splits_that_contradict_each_other_are_refused_before_training(mosi, tmp_path, capsys,
                                                                        edit, says):
    path = _rewrite_splits(mosi, edit)
    assert _train(mosi, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert f"error: {path}: " in error and says in error and error.count("\n") == 1
    assert "'" in error or "empty" in says  # names a few conversations
    assert not (tmp_path / "out").exists()


def test_a_fold_that_tests_what_it_trains_is_refused():
    ids = ("Ses01F_a", "Ses01F_b", "Ses02M_c")
    with pytest.raises(DataError, match="fold 'session 1': 'Ses01F_b' is in both the train and "
                                        "the test split"):
        _check_fold(Fold("session 1", (1, 2), (), (0, 1)), ids, Path("x.pkl"), named=True)


@pytest.mark.parametrize("dataset", ["CMUMOSI", "IEMOCAPFour", "IEMOCAPSix"])
def test_the_real_label_files_pass_the_split_checks(dataset):
    spec = get_spec(dataset)
    labels = read_label_file(requires_shared_labels(spec.label_file), spec)
    for fold in labels.folds:
        assert fold.train and fold.test and not set(fold.train) & set(fold.test)


# ----------------------------------------------------------------------------- 3. filesystem

def test_a_broken_link_an_utterance_reads_is_named(mosi):
    victim = _a_feature_file(mosi, "a", 3)
    victim.unlink()
    victim.symlink_to(mosi / "gone.npy")
    with pytest.raises(DataError) as error:
        load_dataset("CMUMOSI", mosi)
    assert str(error.value) == (f"{victim}: is a symbolic link to {mosi / 'gone.npy'}, which "
                                f"does not exist; put the utterance's feature file there.")


def test_broken_links_no_utterance_reads_are_ignored_and_said_once(mosi, caplog):
    folder = mosi / "CMUMOSI" / "features" / DEFAULT_FEATURES["v"]
    (folder / "loop.npy").symlink_to("loop.npy")
    (folder / "dangling.npy").symlink_to("/nonexistent/dangling.npy")
    caplog.set_level("INFO")
    load_dataset("CMUMOSI", mosi)
    data_fingerprint("CMUMOSI", mosi)
    warnings = [r.getMessage() for r in caplog.records if "broken link" in r.getMessage()]
    assert len(warnings) == 1 and "loop.npy" in warnings[0] and "dangling.npy" in warnings[0]


class _FullDisk:
    """A file on a device that fills up half-way through the first write."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._handle.write(data[:len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def _fill_disk_for(monkeypatch, part: str) -> None:
    """Writes to paths containing `part` find the device full."""
    real = atomic._opened

    def opened(path, mode):
        handle = real(path, mode)
        return _FullDisk(handle) if part in str(path) else handle
    monkeypatch.setattr(atomic, "_opened", opened)


@pytest.mark.parametrize("part, folder", [
    ("checkpoint_fold1.pt", "attempt"), ("_stage1/", "_stage1"), ("epochs.jsonl", "attempt"),
    ("run.log", "attempt")])
def test_a_full_disk_is_one_sentence_and_leaves_nothing_behind(tiny_root, finished, tmp_path,
                                                               monkeypatch, capsys, part, folder):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _files(out)
    _fill_disk_for(monkeypatch, part)
    capsys.readouterr()
    # A new run (its own stage 1 too) beside the finished one.
    assert _train(tiny_root, out, "--epochs", "5", "--stage-epochs", "1") == 1
    captured = capsys.readouterr()
    (attempt,) = (out / "CMUMOSI").glob("*.attempt")
    where = attempt if folder == "attempt" else out / folder
    assert f"error: no space left on the device of {where}; free some space" in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.tmp.*"))
    assert {k: v for k, v in _files(out).items() if k in before} == before
    for line in (attempt / "epochs.jsonl").read_text().splitlines():
        json.loads(line)  # no half line


def test_a_full_disk_costs_the_feature_cache_only(mosi, monkeypatch, caplog):
    _fill_disk_for(monkeypatch, ".cache/")
    data = load_dataset("CMUMOSI", mosi)
    assert "no space left on the device of" in caplog.text and "loading will stay slow" in \
        caplog.text
    assert not list((mosi / "CMUMOSI" / ".cache").iterdir())
    assert data.fingerprint == data_fingerprint("CMUMOSI", mosi)


def _read_only(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only to this process as a read-only mount is (the tests may run as
    root, whom permission bits do not stop)."""
    folder = folder.resolve()

    def inside(path) -> bool:
        try:
            return Path(os.path.abspath(os.fspath(path))).is_relative_to(folder)
        except TypeError:  # a file descriptor
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real = {name: getattr(os, name) for name in ("open", "mkdir", "access", "replace", "unlink",
                                                 "rmdir", "rename")}
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            refuse(path)
        return real["mkdir"](path, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        return False if inside(path) and mode & os.W_OK else real["access"](path, mode, *args,
                                                                             **kwargs)

    def changing(name):
        def change(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return change

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "access", access)
    for name in ("replace", "unlink", "rmdir", "rename"):
        monkeypatch.setattr(os, name, changing(name))


def test_read_only_run_folders_are_read_skipped_and_reported_elsewhere(tiny_root, finished,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = _files(out)
    _read_only(monkeypatch, out)
    capsys.readouterr()
    assert _train(tiny_root, out) == 0  # complete: reading is enough to skip it
    assert "complete already" in capsys.readouterr().out
    assert _sweep(tiny_root, out) == 0
    assert "0 trained, 1 complete before, 0 failed" in capsys.readouterr().out
    assert _train(tiny_root, out, "--test-condition", "a") == 2  # this one would need writing
    assert "is not a writable folder" in capsys.readouterr().err

    assert report.main([str(out), "--no-plots"]) == 2
    error = capsys.readouterr().err
    assert f"error: {out / 'report'} cannot be written (Read-only file system); write the " \
           f"report elsewhere with `python -m MoMKE.report {out} --out DIR`." in error
    assert report.main([str(out), "--no-plots", "--out", str(tmp_path / "tables")]) == 0
    assert (tmp_path / "tables" / "CMUMOSI.md").is_file()
    assert _files(out) == before


# ----------------------------------------------------------------------------- 4. sweeps

_TRAIN_ELSEWHERE = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from MoMKE.runlog import RunLock
    folder, prepared, other = map(Path, sys.argv[1:])
    lock = RunLock(folder)
    lock.acquire()
    print("locked", flush=True)
    deadline = time.time() + 120
    while not (other / "result.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the sweep is waiting by now
    shutil.move(prepared, folder)  # the run this process "trained"
    lock.release()
""")


def test_a_run_another_sweep_trains_is_waited_for_not_failed(tiny_root, finished, tmp_path,
                                                             capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    config = sweep.parse_config(["--dataset", "CMUMOSI", "--data-root", str(tiny_root),
                                 "--output-dir", str(out), *TINY, "--test-condition", "atv,t"])
    theirs, mine = (run.folder for run in sweep.plan(config, [5]))
    prepared = tmp_path / "prepared"
    shutil.move(theirs, prepared)  # the other sweep's result, put in place while we wait
    holder = subprocess.Popen([sys.executable, "-c", _TRAIN_ELSEWHERE, str(theirs),
                               str(prepared), str(mine)], cwd=PROJECT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert _sweep(tiny_root, out, "--test-condition", "atv,t") == 0
    finally:
        holder.kill()
        holder.wait()
    text = capsys.readouterr().out
    assert "waiting for CMUMOSI fixed-atv seed 5: another process is training it (pid " \
           f"{holder.pid}" in text
    assert "1 trained, 0 complete before, 1 completed by another process, 0 failed" in text
    assert "FAILED" not in text and (theirs / "result.json").is_file()


def test_ctrl_c_in_a_sweep_is_one_line_and_exit_130(tiny_root, finished, tmp_path, monkeypatch,
                                                    capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep.runner, "run", interrupted)
    capsys.readouterr()
    assert _sweep(tiny_root, out, "--test-condition", "atv,t") == 130
    error = capsys.readouterr().err
    assert error.strip() == "interrupted: 1 of 2 planned runs are complete; run the same " \
                            "command again to continue (complete runs are skipped)."


def test_a_seed_listed_twice_is_planned_once(tiny_root, tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(sweep.runner, "run", lambda config, *rest: trained.append(config.seed))
    assert _sweep(tiny_root, tmp_path, "--seeds", "1,1,2") == 0
    out = capsys.readouterr().out
    assert trained == [1, 2] and "2 trained, 0 complete before, 0 failed" in out
    assert "--seeds 1,1,2 lists 1 more than once; each seed is planned once" in out


def test_a_predictions_file_that_cannot_be_read_is_named(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (run,) = (out / "CMUMOSI").iterdir()
    (run / "predictions.npz").write_bytes(b"PK\x03\x04 not a zip file")
    assert report.main([str(out), "--no-plots", "--ci", "--resamples", "20"]) == 0
    text = capsys.readouterr().out
    assert f"No interval from 1 run(s) (nor for the rows and averages they are part of): " \
           f"{run}/predictions.npz cannot be read (BadZipFile" in text


def test_a_failed_run_links_the_log_of_this_attempt_only(tiny_root, tmp_path, monkeypatch,
                                                         capsys):
    original = trainer.FoldTrainer._train_epoch

    def poisoned(self, stage):
        scores = original(self, stage)
        if stage == 2:
            scores["loss"] = float("nan")
        return scores
    monkeypatch.setattr(trainer.FoldTrainer, "_train_epoch", poisoned)
    assert _sweep(tiny_root, tmp_path) == 1
    (attempt,) = (tmp_path / "CMUMOSI").glob("*.attempt")
    assert f"(log: {attempt / 'run.log'})" in capsys.readouterr().out

    monkeypatch.undo()  # the next attempt fails before it starts: its folder became read-only
    config = sweep.parse_config(["--dataset", "CMUMOSI", "--data-root", str(tiny_root),
                                 "--output-dir", str(tmp_path), *TINY])
    _read_only(monkeypatch, tmp_path / "CMUMOSI")
    summary = sweep.run_locally(sweep.plan(config, [5]))
    text = summary.report()
    assert f"FAILED CMUMOSI fixed-atv seed 5: CannotWrite: {tmp_path / 'CMUMOSI'} cannot be " \
           f"written (Read-only file system); make it writable or write elsewhere" in text
    assert "(no run log of this attempt: it failed before its run started)" in text
    assert str(attempt / "run.log") not in text
