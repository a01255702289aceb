"""A one-file cache of a loaded feature set, so that the ~68,000 small files of CMU-MOSEI are
read once, and the data's identity: a digest of its content.

The cache file sits in `<data root>/<DIR>/.cache/` (inside the git-ignored features tree). Its name
says which dataset and feature folders it holds. Inside it carries two digests:

    stamp        the quick "unchanged?" check: the name, size, modification time, change time
                 and inode of every file below the feature folders and of the label file (what
                 git's index keeps, for the same reason: a file rewritten with its size and
                 modification time kept, by `cp -p`, `rsync -t` or a restore, still gets a new
                 change time, which a user cannot set back, and `rsync` a new inode), and the
                 digest of the code that reads them (`dataloader/source.py`), so arrays that
                 other reading rules computed are read again
    fingerprint  the content: a digest of the label file's bytes and of every feature file's
                 bytes as the loader read them (`ContentDigest`), computed while the cache is
                 built, which reads every byte once anyway; it is the run identity's data part

A load whose stamp matches reuses the arrays and the fingerprint; any other rebuilds both. So two
runs share a data fingerprint exactly when they read the same bytes, wherever the files lie and
whatever their times say.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat as stat_mode
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from dataloader.atomic import atomic_file, write_errors_named
from dataloader.datasets import DataError
from dataloader.files import open_regular
from dataloader.source import reading_code_version

log = logging.getLogger(__name__)

# Bump when the stamp changes: old caches rebuild. The reading rules need no bump: the stamp holds
# the digest of the code that reads the data (`reading_code_version`).
CACHE_VERSION = 3


@dataclass(frozen=True)
class FileScan:
    """What the quick check found below some paths."""

    stamp: str  # digest of name, size, mtime, ctime and inode of every entry
    broken: tuple[Path, ...]  # links that lead nowhere or loop, and folders that cannot be listed
    entries: int  # files and folders stamped


def scan_files(paths: Iterable[Path]) -> FileScan:
    """The stamp of every entry below each of `paths` (or of the file), following links as the
    loader does; a link that leads nowhere or loops is stamped as the link itself and listed in
    `broken` (the loader names it if an utterance reads it; the caller says the rest is
    ignored)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {reading_code_version()}".encode())
    broken: list[Path] = []
    entries = 0
    for root in paths:
        names: list[str] = []
        stats: list[int] = []  # size, mtime_ns, ctime_ns, inode, size, ...
        if root.is_file():
            names.append(root.name)
            stats += _fields(root.stat())
        else:
            try:
                top = os.stat(root)
                _walk(root, "", names, stats, broken, {(top.st_dev, top.st_ino)})
            except OSError as error:
                raise DataError(f"{root}: cannot be listed ({error.strerror}); make the folder "
                                f"readable or pass another feature folder.") from None
        order = sorted(range(len(names)), key=names.__getitem__)
        table = np.array(stats, dtype=np.int64).reshape(-1, 4)[order]
        digest.update(f"\n#{root.name}\n".encode())
        digest.update("\n".join(names[i] for i in order).encode())
        digest.update(table.tobytes())
        entries += len(names)
    return FileScan(digest.hexdigest(), tuple(broken), entries)


def _fields(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _walk(folder: str | Path, prefix: str, names: list[str], stats: list[int],
          broken: list[Path], ancestors: set[tuple[int, int]]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            name = prefix + entry.name
            try:
                stat = entry.stat()  # through a link: what a reader of the entry gets
            except OSError:  # a dangling or looping link
                stat = None
            if stat is not None and stat_mode.S_ISDIR(stat.st_mode):
                key = (stat.st_dev, stat.st_ino)
                if key not in ancestors:  # a link back up would walk forever
                    try:
                        _walk(entry.path, name + "/", names, stats, broken, ancestors | {key})
                        names.append(name + "/")
                        stats += _fields(stat)
                        continue
                    except OSError:  # a folder that cannot be listed
                        pass
                stat = None
            if stat is None:
                try:
                    stat = entry.stat(follow_symlinks=False)
                except OSError:  # removed while we looked: not there
                    continue
                broken.append(Path(entry.path))
            names.append(name)
            stats += _fields(stat)


class ContentDigest:
    """A digest of the bytes of every file read, with its name, in reading order."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"MoMKE content v1")

    def add(self, name: str, content: bytes) -> None:
        # Lengths first, so that no two (name, bytes) sequences give the same digest input.
        self._digest.update(f"{len(name)}:{name}:{len(content)}:".encode())
        self._digest.update(content)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def cache_path(dataset_dir: Path, dataset: str, feature_names: Iterable[str]) -> Path:
    key = hashlib.sha256("|".join([dataset, *feature_names]).encode()).hexdigest()[:16]
    return dataset_dir / ".cache" / f"{dataset}-{key}.bin"


# File format: 8-byte little-endian header length, a JSON header (stamp, fingerprint and, per
# array, its name, dtype and shape), then the raw arrays in header order. Reading is one
# `readinto` per array, which is several times faster than unpacking an .npz of the same size.
_HEADER_SIZE = struct.Struct("<Q")


# What a cache may hold: array name -> (dtype, shape with None for a free dimension). Anything
# else (another dtype, such as an object array whose bytes would be read as pointers; another
# name or shape) means the file is not what this loader wrote, and it is rebuilt.
Layout = dict[str, tuple[str, tuple[int | None, ...]]]


def cached_fingerprint(path: Path, stamp: str) -> str | None:
    """The content fingerprint stored with the cache at `path` when it was built from files
    with this `stamp`, else None; reads the header only."""
    try:
        with open_regular(path) as handle:
            header = _read_header(handle)
    except (OSError, ValueError, struct.error, DataError):
        return None
    fingerprint = header.get("fingerprint")
    if header.get("stamp") != stamp or not isinstance(fingerprint, str) or len(fingerprint) != 64:
        return None
    return fingerprint


def _read_header(handle: BinaryIO) -> dict:
    (length,) = _HEADER_SIZE.unpack(handle.read(_HEADER_SIZE.size))
    header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("malformed header")
    return header


def load_cache(path: Path, stamp: str, expected: Layout,
               max_abs: float = float("inf")) -> dict[str, np.ndarray] | None:
    """The arrays stored at `path` if it exists, was built from files with this `stamp`, has
    exactly the `expected` names, dtypes and shapes, and holds finite values within `max_abs`
    (checked vectorised after loading: cheap next to reading the files). Otherwise None, with one
    warning when the file is there but unusable."""
    if not path.exists():
        return None
    try:
        with open_regular(path) as handle:
            header = _read_header(handle)
            if header.get("stamp") != stamp:
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


def save_cache(path: Path, stamp: str, arrays: dict[str, np.ndarray],
               fingerprint: str = "") -> None:
    """Write the cache atomically; a read-only or full data folder only costs the speed-up
    (said once, nothing left behind)."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    header = json.dumps({"stamp": stamp, "fingerprint": fingerprint,
                         "arrays": [(name, a.dtype.str, a.shape)
                                    for name, a in arrays.items()]}).encode()
    try:
        with write_errors_named(path.parent.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as handle:
            handle.write(_HEADER_SIZE.pack(len(header)) + header)
            for array in arrays.values():
                handle.write(memoryview(array).cast("B"))
    except OSError as error:
        log.warning("could not write the feature cache %s (%s); loading will stay slow", path,
                    error.strerror or error)
