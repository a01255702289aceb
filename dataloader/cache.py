"""A one-file cache of a loaded feature set, so that the ~68,000 small files of CMU-MOSEI are
read once.

The cache file sits in `<data root>/<DIR>/.cache/` (inside the git-ignored features tree). Its name
says which dataset and feature folders it holds; inside it carries a stamp of every file it was
built from (relative path, size, modification time) and of the label file. Any change to those
files changes the stamp, and the next load rebuilds the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the loader's reading rules change, to invalidate old caches


def files_stamp(paths: Iterable[Path]) -> str:
    """A digest of the name, size and mtime of every file below each of `paths` (or the file)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for root in paths:
        names: list[str] = []
        stats: list[int] = []  # size, mtime_ns, size, mtime_ns, ...
        if root.is_file():
            stat = root.stat()
            names.append(root.name)
            stats += (stat.st_size, stat.st_mtime_ns)
        else:
            _walk(root, "", names, stats)
        order = sorted(range(len(names)), key=names.__getitem__)
        table = np.array(stats, dtype=np.int64).reshape(-1, 2)[order]
        digest.update(f"\n#{root.name}\n".encode())
        digest.update("\n".join(names[i] for i in order).encode())
        digest.update(table.tobytes())
    return digest.hexdigest()


def _walk(folder: Path | str, prefix: str, names: list[str], stats: list[int]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _walk(entry.path, prefix + entry.name + "/", names, stats)
                continue
            stat = entry.stat()
            names.append(prefix + entry.name)
            stats.append(stat.st_size)
            stats.append(stat.st_mtime_ns)


def cache_path(dataset_dir: Path, dataset: str, feature_names: Iterable[str]) -> Path:
    key = hashlib.sha256("|".join([dataset, *feature_names]).encode()).hexdigest()[:16]
    return dataset_dir / ".cache" / f"{dataset}-{key}.bin"


# File format: 8-byte little-endian header length, a JSON header (stamp and, per array, its name,
# dtype, shape and byte offset), then the raw arrays. Reading is one `readinto` per array, which is
# several times faster than unpacking an .npz of the same size.
_HEADER_SIZE = struct.Struct("<Q")


# What a cache may hold: array name -> (dtype, shape with None for a free dimension). Anything
# else (another dtype, such as an object array whose bytes would be read as pointers; another
# name or shape) means the file is not what this loader wrote, and it is rebuilt.
Layout = dict[str, tuple[str, tuple[int | None, ...]]]


def load_cache(path: Path, stamp: str, expected: Layout,
               max_abs: float = float("inf")) -> dict[str, np.ndarray] | None:
    """The arrays stored at `path` if it exists, was built from files with this `stamp`, has
    exactly the `expected` names, dtypes and shapes, and holds finite values within `max_abs`
    (checked vectorised after loading: cheap next to reading the files). Otherwise None, with one
    warning when the file is there but unusable."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            (length,) = _HEADER_SIZE.unpack(handle.read(_HEADER_SIZE.size))
            header = json.loads(handle.read(length))
            if header["stamp"] != stamp:
                log.info("feature cache %s is stale (files changed); rebuilding it", path)
                return None
            entries = _checked_entries(header["arrays"], expected)
            arrays = {}
            for name, dtype, shape in entries:
                array = np.empty(shape, dtype=dtype)
                if handle.readinto(memoryview(array).cast("B")) != array.nbytes:
                    raise ValueError("file is truncated")
                arrays[name] = array
            if handle.read(1):
                raise ValueError("file has bytes after its arrays")
        for name, array in arrays.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"{name} holds NaN or infinite values")
            if array.size and np.abs(array).max() > max_abs:
                raise ValueError(f"{name} holds values beyond {max_abs:g}")
        return arrays
    except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("feature cache %s is unusable (%s); rebuilding it from the feature files",
                    path, error)
        return None


def _checked_entries(entries: object, expected: Layout) -> list[tuple[str, np.dtype, tuple]]:
    """The header's (name, dtype, shape) entries, checked against `expected` before any byte is
    read into an array."""
    if not isinstance(entries, list) or any(
            not isinstance(e, list) or len(e) != 3 for e in entries):
        raise ValueError("malformed header")
    names = [e[0] for e in entries]
    if sorted(names) != sorted(expected):
        raise ValueError(f"holds arrays {sorted(map(str, names))}, expected {sorted(expected)}")
    checked = []
    for name, dtype, shape in entries:
        want_dtype, want_shape = expected[name]
        if dtype != np.dtype(want_dtype).str:
            raise ValueError(f"{name} has dtype {dtype!r}, expected {np.dtype(want_dtype).str!r}")
        if not isinstance(shape, list) or len(shape) != len(want_shape) or any(
                not isinstance(n, int) or n < 0 or (w is not None and n != w)
                for n, w in zip(shape, want_shape)):
            raise ValueError(f"{name} has shape {shape}, expected {want_shape}")
        checked.append((name, np.dtype(want_dtype), tuple(shape)))
    return checked


def save_cache(path: Path, stamp: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically; a read-only data folder only costs the speed-up."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    header = json.dumps({"stamp": stamp, "arrays": [(name, a.dtype.str, a.shape)
                                                    for name, a in arrays.items()]}).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        with temporary.open("wb") as handle:
            handle.write(_HEADER_SIZE.pack(len(header)) + header)
            for array in arrays.values():
                handle.write(memoryview(array).cast("B"))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("could not write the feature cache %s (%s); loading will stay slow", path, error)
