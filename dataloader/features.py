"""Read one GCNet feature folder into a matrix with one row per utterance.

docs/data.md. A file `<utterance_id>.npy` holds `[dim]`, `[1, dim]` or `[T, dim]` (mean over T); a
folder `<utterance_id>/` holds per-face vectors (mean over faces). IEMOCAP entries are found by the
prefix `<utterance_id>*`, and of an IEMOCAP face folder only the faces of the utterance's speaker
count (a face file name carries 'F' or 'M'). An utterance without any usable face gets a zero
vector; how many did is returned so the caller can report it once.
"""
from __future__ import annotations

import bisect
import errno
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dataloader.cache import ContentDigest
from dataloader.datasets import DataError
from dataloader.files import open_regular


@dataclass(frozen=True)
class FeatureMatrix:
    values: np.ndarray  # (N, dim) float32, rows in the order of the requested utterance ids
    empty_faces: int  # utterances whose face folder had no face (of their speaker): zero rows


class _FolderIndex:
    """The entries of one folder, listed once, for exact and prefix lookups."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names = sorted(os.listdir(folder))
        self._set = set(self.names)

    def exact(self, utterance_id: str) -> str | None:
        for name in (utterance_id + ".npy", utterance_id):
            if name in self._set:
                return name
        return None

    def by_prefix(self, utterance_id: str) -> list[str]:
        start = bisect.bisect_left(self.names, utterance_id)
        matches = []
        for name in self.names[start:]:
            if not name.startswith(utterance_id):
                break
            matches.append(name)
        return matches


# Larger magnitudes overflow float32 arithmetic within a few layers (a square of 1e20 is inf):
# such a file is a broken extraction, refused before training rather than trained into NaN.
MAX_ABS_FEATURE = 1e6


def read_feature_folder(folder: Path, utterance_ids: Sequence[str],
                        speakers: Sequence[str] | None, *, faces: bool = False,
                        content: ContentDigest | None = None) -> FeatureMatrix:
    """Read `folder` for every id; `speakers` (IEMOCAP) enables prefix lookup and face selection.
    Only with `faces` (the visual folder) may an entry be a folder of face vectors; an empty one
    becomes a zero row only with `speakers` (IEMOCAP's GCNet rule), elsewhere it is an error.
    Every file's bytes go into `content` as they are read (the data's identity)."""
    if not folder.is_dir():
        raise DataError(
            f"{folder}: feature folder not found; unpack the GCNet features there, pass the right "
            f"--audio-feature/--text-feature/--video-feature name, or generate the synthetic set "
            f"with `python -m dataloader.synthetic`.")
    index = _FolderIndex(folder)
    rows: list[np.ndarray | None] = []
    dim_source: tuple[int, Path] | None = None
    empty = 0
    for i, uid in enumerate(utterance_ids):
        speaker = speakers[i] if speakers is not None else None
        path = folder / _entry_name(index, uid, by_prefix=speaker is not None)
        if path.is_dir():
            if not faces:
                raise DataError(f"{path}: is a folder, but {folder.name} entries must be .npy "
                                f"files (only visual features may be folders of faces); "
                                f"replace it with the utterance's .npy file.")
            vectors = _read_faces(path, uid, speaker, content)
            if not vectors and speakers is None:
                raise DataError(f"{path}: a face folder with no .npy face vector; put the "
                                f"utterance's feature file there, or remove the empty folder.")
        else:
            vectors = [_read_array(path, content)]
        for vector in vectors:
            dim_source = _check_dim(vector, path, dim_source)
        if vectors:
            rows.append(np.mean(np.stack(vectors), axis=0) if len(vectors) > 1 else vectors[0])
        else:
            rows.append(None)
            empty += 1
    if dim_source is None:
        raise DataError(f"{folder}: no feature file holds any vector; re-extract the features.")
    dim = dim_source[0]
    zero = np.zeros(dim, dtype=np.float32)
    values = np.stack([zero if row is None else row for row in rows]).astype(np.float32, copy=False)
    return FeatureMatrix(values, empty)


def _entry_name(index: _FolderIndex, uid: str, *, by_prefix: bool) -> str:
    if by_prefix:
        matches = index.by_prefix(uid)
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DataError(f"{index.folder}: {len(matches)} entries start with {uid!r} "
                            f"({', '.join(matches[:3])}); keep exactly one per utterance.")
    else:
        name = index.exact(uid)
        if name is not None:
            return name
    raise DataError(f"{index.folder}: no feature file for utterance {uid!r}; the feature folder "
                    f"is incomplete, re-extract or re-download it.")


def _read_array(path: Path, content: ContentDigest | None = None) -> np.ndarray:
    """One utterance vector from a `[dim]`, `[1, dim]` or `[T, dim]` file (mean over T). The
    bytes are read once, for the content digest and the array both."""
    try:
        with open_regular(path) as handle:
            raw = handle.read()
    except OSError as error:
        raise DataError(f"{path}: {_unreadable(path, error)}; put the utterance's feature file "
                        f"there.") from None
    if content is not None:
        content.add(f"{path.parent.name}/{path.name}", raw)
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as error:
        raise DataError(f"{path}: cannot be read as a .npy array ({error}); replace the file.") \
            from None
    if array.ndim == 2 and array.shape[0] >= 1:
        array = array.mean(axis=0) if array.shape[0] > 1 else array[0]
    if array.ndim != 1 or array.shape[0] == 0:
        raise DataError(f"{path}: has shape {tuple(array.shape)}, but a feature file must be "
                        f"[dim], [1, dim] or [T, dim]; re-extract it.")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: holds {array.dtype} values, not numbers; re-extract it.")
    vector = array.astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise DataError(f"{path}: contains NaN or infinite values; re-extract this feature file.")
    if np.abs(vector).max() > MAX_ABS_FEATURE:
        raise DataError(f"{path}: holds values up to {np.abs(vector).max():.3g} in magnitude "
                        f"(limit {MAX_ABS_FEATURE:g}, beyond which float32 training overflows); "
                        f"re-extract or rescale this feature file.")
    return vector


def _unreadable(path: Path, error: OSError) -> str:
    """Why `path` cannot be opened, in a few words: a broken link says where it leads."""
    if path.is_symlink():
        target = os.readlink(path)
        if error.errno == errno.ELOOP:
            return f"is a symbolic link that loops back on itself (to {target})"
        if error.errno == errno.ENOENT:
            return f"is a symbolic link to {target}, which does not exist"
    return f"cannot be read ({error.strerror})"


def _read_faces(folder: Path, uid: str, speaker: str | None,
                content: ContentDigest | None) -> list[np.ndarray]:
    """The face vectors of a face folder; with `speaker`, only that speaker's faces."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        raise DataError(f"{folder}: {_unreadable(folder, error)}; make the face folder readable "
                        f"or replace it with the utterance's feature file.") from None
    faces = []
    for name in names:
        if not name.endswith(".npy"):
            continue
        if speaker is not None and _face_speaker(name, uid, folder) != speaker:
            continue
        faces.append(_read_array(folder / name, content))
    return faces


def _face_speaker(name: str, uid: str, folder: Path) -> str:
    # The utterance id itself contains 'F' or 'M' (Ses01F_...), so look only at what follows it.
    tag = name[len(uid):] if name.startswith(uid) else name
    if "F" in tag:
        return "F"
    if "M" in tag:
        return "M"
    raise DataError(f"{folder / name}: an IEMOCAP face file name must contain 'F' or 'M' for the "
                    f"speaker it shows; rename it.")


def _check_dim(vector: np.ndarray, path: Path,
               seen: tuple[int, Path] | None) -> tuple[int, Path]:
    if seen is not None and vector.shape[0] != seen[0]:
        raise DataError(f"{path}: has dimension {vector.shape[0]} but {seen[1]} has {seen[0]}; "
                        f"all files of one feature must share a dimension, re-extract the folder.")
    return seen or (vector.shape[0], path)
