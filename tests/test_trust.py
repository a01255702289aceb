"""A number in a table is right, or the run fails loudly; nothing finished is ever lost.

One test (or a few) per failure class: divergence, atomic --force, run
identity, one writer per run folder, the checked feature cache, and a report that never crashes
on what it finds. Each failed on the code before the change.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloader import cache as feature_cache
from dataloader.datasets import DEFAULT_FEATURES
from dataloader.gcnet import load_dataset
from MoMKE import trainer
from MoMKE.experiments import sweep
from MoMKE.results import report
from MoMKE.runlog import RunLock
from MoMKE.selection import select_epochs
from MoMKE.train import main

PROJECT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "8", "--depth", "1", "--batch-size", "4", "--device", "cpu", "--seed", "5",
        "--epochs", "4"]


@pytest.fixture
def mosi(tmp_path, tiny_root):
    """A private copy of the tiny CMU-MOSI set that a test may change."""
    shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "data" / "CMUMOSI",
                    ignore=shutil.ignore_patterns(".cache"))
    return tmp_path / "data"


def _train(root, output, *extra) -> int:
    return main(["--dataset", "CMUMOSI", "--data-root", str(root), "--output-dir", str(output),
                 *TINY, *extra])


def _results(output) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(output).glob("*/*/result.json"))]


def _poison_stage2_loss(monkeypatch, only_condition: str | None = None) -> None:
    """Make the stage-2 training loss NaN (of one condition only, when given)."""
    original = trainer.FoldTrainer._train_epoch

    def poisoned(self, stage):
        scores = original(self, stage)
        if stage == 2 and only_condition in (None, self.setting.condition):
            scores["loss"] = float("nan")
        return scores
    monkeypatch.setattr(trainer.FoldTrainer, "_train_epoch", poisoned)


# ----------------------------------------------------------------------------- 1. divergence

def test_a_diverged_run_fails_and_writes_no_result(tiny_root, tmp_path, monkeypatch, capsys):
    _poison_stage2_loss(monkeypatch)
    assert _train(tiny_root, tmp_path) == 1
    error = capsys.readouterr().out
    assert "CMUMOSI fixed-atv fold 1: training diverged at stage 2 epoch 3 (train loss is not " \
           "finite); no result was written. Try a lower --lr" in error
    assert not list(tmp_path.rglob("result.json"))


def test_a_sweep_lists_a_diverged_run_among_its_failures_and_goes_on(tiny_root, tmp_path,
                                                                      monkeypatch, capsys):
    _poison_stage2_loss(monkeypatch, only_condition="a")
    code = sweep.main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(tmp_path), "--test-condition", "a,t", "--jobs", "1", *TINY])
    assert code == 1
    summary = capsys.readouterr().out
    assert "1 trained, 0 complete before, 1 failed" in summary
    assert "FAILED CMUMOSI fixed-a seed 5: Diverged" in summary
    assert [r["condition"] for r in _results(tmp_path)] == ["t"]


def test_features_that_overflow_float32_are_refused_naming_the_file(mosi):
    victim = sorted((mosi / "CMUMOSI" / "features" / DEFAULT_FEATURES["v"]).glob("*.npy"))[2]
    values = np.load(victim)
    values[0] = 1e30
    np.save(victim, values)
    from dataloader.datasets import DataError
    with pytest.raises(DataError, match=f"{victim.name}: holds values up to [0-9.]+e\\+29 in magnitude"):
        load_dataset("CMUMOSI", mosi)


# ----------------------------------------------------------------------------- 2. atomic --force

def test_a_failed_force_retrain_leaves_the_earlier_result_intact(tiny_root, tmp_path,
                                                                 monkeypatch):
    assert _train(tiny_root, tmp_path) == 0
    folder = next((tmp_path / "CMUMOSI").iterdir())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _poison_stage2_loss(monkeypatch)
    assert _train(tiny_root, tmp_path, "--force") == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert (folder.with_name(folder.name + ".attempt") / "run.log").is_file()  # its log is kept

    monkeypatch.undo()
    assert _train(tiny_root, tmp_path, "--force") == 0  # a completed retrain replaces it
    assert (folder / "result.json").read_bytes() != before["result.json"]
    assert not folder.with_name(folder.name + ".attempt").exists()


def test_a_killed_force_retrain_leaves_the_earlier_result_intact(tiny_root, tmp_path):
    # The same run retrained (the same identity, so into the same folder), killed once its
    # attempt has logged an epoch and long before it could finish.
    assert _train(tiny_root, tmp_path, "--epochs", "60") == 0
    folder = next((tmp_path / "CMUMOSI").iterdir())
    before = (folder / "result.json").read_bytes()
    command = [sys.executable, "-m", "MoMKE.train", "--dataset", "CMUMOSI", "--data-root",
               str(tiny_root), "--output-dir", str(tmp_path), *TINY[:-1], "60", "--force"]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    attempt = folder.with_name(folder.name + ".attempt") / "epochs.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (attempt.is_file() and attempt.stat().st_size):
        time.sleep(0.05)
    seen = attempt.is_file() and attempt.stat().st_size > 0
    process.kill()
    process.wait()
    assert seen, "the retrain never logged an epoch into its attempt folder"
    assert (folder / "result.json").read_bytes() == before
    assert (folder / "checkpoint_fold1.pt").is_file()


# ----------------------------------------------------------------------------- 3. run identity

def test_rates_that_round_alike_are_different_runs(tiny_root, tmp_path):
    assert _train(tiny_root, tmp_path, "--missing-rate", "0.14,0.1") == 0
    names = sorted(p.name.split("_")[0] for p in (tmp_path / "CMUMOSI").iterdir())
    assert names == ["random-0.1", "random-0.14"]
    assert sorted(r["missing_rate"] for r in _results(tmp_path)) == [0.1, 0.14]


def test_changed_data_under_the_same_root_is_not_reused(mosi, tmp_path, capsys):
    assert _train(mosi, tmp_path / "out") == 0
    victim = sorted((mosi / "CMUMOSI" / "features" / DEFAULT_FEATURES["t"]).glob("*.npy"))[0]
    stat = victim.stat()
    np.save(victim, np.load(victim) * 2)  # new data, same size
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert _train(mosi, tmp_path / "out") == 0
    assert "complete already" not in capsys.readouterr().out
    fingerprints = {r["identity"]["data"] for r in _results(tmp_path / "out")}
    assert len(fingerprints) == 2


def test_changed_code_is_part_of_the_identity_and_of_the_stage1_key(tiny_root, tmp_path,
                                                                    monkeypatch, capsys):
    assert _train(tiny_root, tmp_path) == 0
    monkeypatch.setattr("MoMKE.runlog.code_version", lambda: "changed-model")
    monkeypatch.setattr("MoMKE.stage1_cache.code_version", lambda: "changed-model")
    capsys.readouterr()
    assert _train(tiny_root, tmp_path) == 0
    out = capsys.readouterr().out
    assert "complete already" not in out and "stage 1 reused" not in out
    codes = {r["identity"]["code"] for r in _results(tmp_path)}
    assert len(codes) == 2 and "changed-model" in codes
    assert len(list((tmp_path / "_stage1").iterdir())) == 2


# ----------------------------------------------------------------------------- 4. one writer

_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from MoMKE.runlog import RunLock
    lock = RunLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_process_on_the_same_run_stops_naming_the_first(tiny_root, tmp_path, capsys):
    assert _train(tiny_root, tmp_path, "--epochs", "3") == 0  # learn the run folder's name
    folder = next((tmp_path / "CMUMOSI").iterdir())
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], cwd=PROJECT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert _train(tiny_root, tmp_path, "--epochs", "3", "--force") == 1
        error = capsys.readouterr().err
        assert f"is being trained by another process (pid {holder.pid} on" in error
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock went with it, and the stale lock file blocks nobody.
    assert folder.with_name(folder.name + ".lock").exists()
    assert _train(tiny_root, tmp_path, "--epochs", "3", "--force") == 0
    assert not folder.with_name(folder.name + ".lock").exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RuntimeError, match="being trained by another process"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


# ----------------------------------------------------------------------------- 5. the caches

def _cache_file(root: Path) -> Path:
    return next((root / "CMUMOSI" / ".cache").iterdir())


def _rewrite_cache(path: Path, edit) -> None:
    """Rewrite the cache's JSON header with `edit(header, arrays_bytes) -> arrays_bytes`."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    body = edit(header, bytearray(data[8 + length:]))
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(body))


def _as_object_dtype(header, body):
    header["arrays"][0][1] = "|O"
    return body


def _nan_bytes(header, body):
    body[:4] = np.array([np.nan], dtype="<f4").tobytes()
    return body


def _missing_key(header, body):
    name, dtype, shape = header["arrays"].pop()
    return body[:len(body) - int(np.prod(shape)) * np.dtype(dtype).itemsize]


def _wrong_shape(header, body):
    header["arrays"][0][2] = [header["arrays"][0][2][1], header["arrays"][0][2][0]]
    return body


@pytest.mark.parametrize("damage", [_as_object_dtype, _nan_bytes, _missing_key, _wrong_shape])
def test_a_cache_that_is_off_is_rebuilt_with_one_warning(mosi, damage):
    first = load_dataset("CMUMOSI", mosi)
    _rewrite_cache(_cache_file(mosi), damage)
    # In a child process: the old loader crashed the interpreter on an object dtype.
    child = subprocess.run(
        [sys.executable, "-c", "import sys, numpy as np; from dataloader.gcnet import "
         "load_dataset; d = load_dataset('CMUMOSI', sys.argv[1]); np.save(sys.argv[2], "
         "d.features['a'])", str(mosi), str(mosi / "a.npy")],
        cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stderr.count("is unusable") == 1 and "rebuilding it" in child.stderr
    np.testing.assert_array_equal(np.load(mosi / "a.npy"), first.features["a"])
    assert load_dataset("CMUMOSI", mosi).features["a"].dtype == np.float32  # rebuilt and valid


def test_load_cache_never_reads_an_array_it_did_not_expect(tmp_path):
    path = tmp_path / "c.bin"
    feature_cache.save_cache(path, "s", {"x": np.zeros((2, 3), dtype=np.float32)})
    assert feature_cache.load_cache(path, "s", {"x": ("<f4", (2, None))})["x"].shape == (2, 3)
    assert feature_cache.load_cache(path, "s", {"x": ("<f4", (3, None))}) is None
    assert feature_cache.load_cache(path, "s", {"x": ("<i8", (2, None))}) is None
    assert feature_cache.load_cache(path, "s", {"y": ("<f4", (2, None))}) is None


def test_a_stage1_cache_with_unexpected_keys_is_retrained(tiny_root, tmp_path, capsys):
    assert _train(tiny_root, tmp_path / "one") == 0
    (cached,) = (tmp_path / "one" / "_stage1").iterdir()
    snapshot = torch.load(cached, weights_only=True)
    snapshot["model"]["not.a.parameter"] = torch.zeros(1)
    torch.save(snapshot, cached)
    capsys.readouterr()
    assert _train(tiny_root, tmp_path / "one", "--epochs", "5", "--stage-epochs", "2") == 0
    assert capsys.readouterr().out.count("is unusable: its weights are not this model's") == 1
    assert _train(tiny_root, tmp_path / "two", "--epochs", "5", "--stage-epochs", "2",
                  "--no-reuse-stage1") == 0
    retrained = [r for r in _results(tmp_path / "one") if r["config"]["epochs"] == 5]
    assert retrained[0]["test"] == _results(tmp_path / "two")[0]["test"]


# ----------------------------------------------------------------------------- 6. flags

def test_sweep_output_dir_that_is_a_file_is_refused_once(tiny_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = sweep.main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(blocker), "--test-condition", "a,t", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert f"--output-dir {blocker} is not a writable folder" in err


@pytest.mark.parametrize("seeds", ["-1", str(2**33)])
def test_sweep_seeds_out_of_range_are_refused(tiny_root, tmp_path, capsys, seeds):
    code = sweep.main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(tmp_path / "out"), "--seeds", seeds, *TINY])
    assert code == 2 and "is outside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 7. the report

def test_report_counts_a_copied_run_once_and_lists_what_it_skipped(tiny_root, tmp_path, capsys):
    assert _train(tiny_root, tmp_path / "runs") == 0
    (folder,) = (tmp_path / "runs" / "CMUMOSI").iterdir()
    shutil.copytree(folder, tmp_path / "runs" / "CMUMOSI" / "copy")
    odd = {"garbage": "{not json", "no-test": json.dumps({"complete": True, "dataset": "CMUMOSI"}),
           "null-metrics": None, "wrong-types": None}
    for name, text in odd.items():
        (tmp_path / "runs" / name).mkdir()
        if text is None:
            result = json.loads((folder / "result.json").read_text())
            result.pop("identity_hash")
            if name == "null-metrics":  # what a diverged run wrote before the guard
                result["test"]["last"] = {k: None for k in result["test"]["last"]}
            else:
                result["seed"] = "66"
            text = json.dumps(result)
        (tmp_path / "runs" / name / "result.json").write_text(text)
    assert report.main([str(tmp_path / "runs"), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "| atv | 1 |" in captured.out  # one seed, not "± 0.00" over two copies
    for name, why in (("garbage", "does not parse"), ("no-test", "lacks"),
                      ("null-metrics", "hold null or non-numbers"),
                      ("wrong-types", "fields of the wrong type"), ("", "a copy, counted once")):
        assert any(line.startswith("skipped") and name in line and why in line
                   for line in captured.err.splitlines()), (name, captured.err)


# ----------------------------------------------------------------------------- official switches

def test_select_from_all_lets_a_stage1_epoch_win():
    def record(stage, epoch, test, val):
        scores = lambda f1: {"f1": f1, "loss": 0.0}  # noqa: E731
        split = (lambda f1: {"a": scores(f1), "fused": scores(f1)}) if stage == 1 else scores
        return {"stage": stage, "epoch": epoch, "test": split(test), "val": split(val)}
    records = [record(1, 1, 0.9, 0.8), record(2, 2, 0.7, 0.6), record(2, 3, 0.6, 0.7)]
    assert select_epochs(records, "f1")["best_test"]["epoch"] == 2
    chosen = select_epochs(records, "f1", pool="all")
    assert (chosen["best_test"]["epoch"], chosen["best_val"]["epoch"]) == (1, 1)


def test_official_switch_sets_every_official_choice(tiny_root, tmp_path, capsys):
    assert _train(tiny_root, tmp_path / "runs", "--official") == 0
    (result,) = _results(tmp_path / "runs")
    assert (result["config"]["select_from"], result["config"]["expert_handover"]) == \
        ("all", "last")
    epochs = [json.loads(line) for line in
              next((tmp_path / "runs").glob("CMUMOSI/*/epochs.jsonl")).read_text().splitlines()]
    assert all("fused" in e["test"] for e in epochs if e["stage"] == 1)
    assert report.main([str(tmp_path / "runs"), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "Selection pool: stage-1 and stage-2 epochs (official code) (--select-from all); " \
           "expert hand-over: last" in text
    assert "MAE and Corr: on non-zero labels only" in text
    mae = result["test"]["best_test"]["mae_nonzero"]
    assert f"| {mae:.3f} |" in text
