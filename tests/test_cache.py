"""The feature cache is written once, reused, and invalidated by any change to the files."""
from __future__ import annotations

import os
import shutil

import numpy as np

from dataloader.datasets import DEFAULT_FEATURES
from dataloader.gcnet import load_dataset


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, tiny_root, caplog):
    shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "CMUMOSI",
                    ignore=shutil.ignore_patterns(".cache"))
    caplog.set_level("INFO")
    first = load_dataset("CMUMOSI", tmp_path)
    assert "read from files" in caplog.text
    caches = list((tmp_path / "CMUMOSI" / ".cache").iterdir())
    assert len(caches) == 1

    caplog.clear()
    second = load_dataset("CMUMOSI", tmp_path)
    assert "loaded from cache" in caplog.text
    for m in "atv":
        np.testing.assert_array_equal(first.features[m], second.features[m])

    victim = sorted((tmp_path / "CMUMOSI" / "features" / DEFAULT_FEATURES["a"]).glob("*.npy"))[0]
    row = list(first.utterance_ids).index(victim.stem)
    np.save(victim, np.full(first.dims["a"], 3.0, dtype=np.float32))
    stat = victim.stat()  # same size, so only the modification time tells
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    caplog.clear()
    third = load_dataset("CMUMOSI", tmp_path)
    assert "stale" in caplog.text
    np.testing.assert_array_equal(third.features["a"][row], 3.0)
    assert list((tmp_path / "CMUMOSI" / ".cache").iterdir()) == caches


def test_a_damaged_cache_is_rebuilt(tmp_path, tiny_root):
    shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "CMUMOSI",
                    ignore=shutil.ignore_patterns(".cache"))
    first = load_dataset("CMUMOSI", tmp_path)
    cache = next((tmp_path / "CMUMOSI" / ".cache").iterdir())
    cache.write_bytes(cache.read_bytes()[:100])
    again = load_dataset("CMUMOSI", tmp_path)
    np.testing.assert_array_equal(first.features["t"], again.features["t"])
