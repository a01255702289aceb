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

CACHE_VERSION = 1  # bump when the loader's reading rules change, to invalidate old caches


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


def load_cache(path: Path, stamp: str) -> dict[str, np.ndarray] | None:
    """The arrays stored at `path` if it exists and was built from files with this `stamp`."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            (length,) = _HEADER_SIZE.unpack(handle.read(_HEADER_SIZE.size))
            header = json.loads(handle.read(length))
            if header["stamp"] != stamp:
                log.info("feature cache %s is stale (files changed); rebuilding it", path)
                return None
            arrays = {}
            for name, dtype, shape in header["arrays"]:
                array = np.empty(shape, dtype=np.dtype(dtype))
                if handle.readinto(memoryview(array).cast("B")) != array.nbytes:
                    raise ValueError("file is truncated")
                arrays[name] = array
            return arrays
    except Exception as error:  # a damaged cache is rebuilt, never trusted
        log.warning("feature cache %s is unreadable (%s); rebuilding it", path, error)
        return None


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
