"""Load a dataset in the GCNet layout into one in-memory `MultimodalDataset`.

Layout, checks and the synthetic default: docs/data.md.

    <data_root>/<DIR>/<label file>.pkl
    <data_root>/<DIR>/features/<feature name>/<utterance id>.npy   (or a folder of face vectors)
    <data_root>/<DIR>/SYNTHETIC.json                                (only in generated data)

Utterances of all conversations are stored back to back: conversation c owns rows
`offsets[c]:offsets[c+1]` of every feature matrix, of `labels` and of `utterance_ids`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from dataloader.cache import (ContentDigest, FileScan, cache_path, cached_fingerprint, load_cache,
                               save_cache, scan_files)
from dataloader.datasets import (DEFAULT_FEATURES, MODALITIES, MODALITY_NAMES, DataError,
                                 DatasetSpec, get_spec)
from dataloader.features import MAX_ABS_FEATURE, read_feature_folder
from dataloader.files import check_regular, open_regular
from dataloader.labels import Fold, LabelSet, read_label_file

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = "SYNTHETIC.json"


@dataclass
class MultimodalDataset:
    spec: DatasetSpec
    data_source: str  # "real" or "synthetic"
    root: Path  # <data_root>/<DIR>
    feature_names: dict[str, str]  # modality -> feature folder name
    conversation_ids: tuple[str, ...]  # C
    offsets: np.ndarray  # (C + 1,) int64
    utterance_ids: np.ndarray  # (N,) str
    speakers: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) float32 (regression) or int64 (classes)
    features: dict[str, np.ndarray]  # modality -> (N, dim) float32
    folds: tuple[Fold, ...]
    fingerprint: str = ""  # digest of the bytes of the label file and of every feature file read
    empty_faces: dict[str, int] = field(default_factory=dict)  # modality -> zero-filled rows

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(x.shape[1]) for m, x in self.features.items()}

    @property
    def num_utterances(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def describe(self) -> str:
        dims = ", ".join(f"{MODALITY_NAMES[m]} {self.feature_names[m]} ({d}-d)"
                         for m, d in self.dims.items())
        return (f"{self.spec.name} [{self.data_source} data] from {self.root}: "
                f"{len(self.conversation_ids)} conversations, {self.num_utterances} utterances; {dims}")


def feature_names_from(audio: str | None = None, text: str | None = None,
                       video: str | None = None) -> dict[str, str]:
    """Map modality letters to feature folder names, GCNet's names where one is not given."""
    given = {"a": audio, "t": text, "v": video}
    return {m: given[m] or DEFAULT_FEATURES[m] for m in MODALITIES}


# (cache file, stamp) -> fingerprint, for data this process has read: a read-only data folder
# keeps no cache, and a sweep's planning would otherwise read it twice.
_FINGERPRINTS: dict[tuple[str, str], str] = {}


def data_fingerprint(dataset: str, data_root: str | Path = "features",
                     feature_names: Mapping[str, str] | None = None) -> str:
    """The digest of the content of the label file and of every feature file that
    `load_dataset` reads: part of every run's identity. From the feature cache when the files
    are unchanged (the quick check of `dataloader/cache.py`), otherwise by loading (which
    builds the cache)."""
    spec = get_spec(dataset)
    names = dict(feature_names or feature_names_from())
    root, label_path, folders = _paths(dataset, data_root, names)
    scan = scan_files([label_path, *folders.values()])
    cached_file = cache_path(root, spec.name, [names[m] for m in MODALITIES])
    known = _FINGERPRINTS.get((str(cached_file), scan.stamp)) or cached_fingerprint(
        cached_file, scan.stamp)
    return known or load_dataset(dataset, data_root, names).fingerprint


def _paths(dataset: str, data_root: str | Path,
           feature_names: Mapping[str, str] | None) -> tuple[Path, Path, dict[str, Path]]:
    """(<data_root>/<DIR>, its label file, the feature folder of each modality), all checked."""
    spec = get_spec(dataset)
    names = dict(feature_names or feature_names_from())
    root = Path(data_root) / spec.folder
    label_path = root / spec.label_file
    if label_path.exists():
        check_regular(label_path)
    if not label_path.is_file():
        what = f"is a symbolic link to {os.readlink(label_path)}, which does not exist" \
            if label_path.is_symlink() else "label file not found"
        raise DataError(
            f"{label_path}: {what}; unpack the GCNet {spec.folder} data under "
            f"{Path(data_root)} (see docs/data.md) or generate the synthetic set with "
            f"`python -m dataloader.synthetic --dataset {spec.name} --out {data_root}`.")
    folders = {m: root / "features" / names[m] for m in MODALITIES}
    for m, folder in folders.items():
        if not folder.is_dir():
            raise DataError(
                f"{folder}: feature folder for {MODALITY_NAMES[m]} not found; pass the folder name "
                f"with --{ 'video' if m == 'v' else MODALITY_NAMES[m]}-feature or unpack the "
                f"features there.")
    return root, label_path, folders


def load_dataset(dataset: str, data_root: str | Path = "features",
                 feature_names: Mapping[str, str] | None = None, *,
                 use_cache: bool = True) -> MultimodalDataset:
    """Read `<data_root>/<DIR>/` for `dataset`, through the feature cache when it is fresh."""
    spec = get_spec(dataset)
    names = dict(feature_names or feature_names_from())
    root, label_path, folders = _paths(dataset, data_root, names)
    labels = read_label_file(label_path, spec)
    source = "synthetic" if (root / SYNTHETIC_MARKER).is_file() else "real"

    started = time.perf_counter()
    scan = scan_files([label_path, *folders.values()])  # before reading: a change meanwhile shows
    stamp = scan.stamp
    cached_file = cache_path(root, spec.name, [names[m] for m in MODALITIES])
    expected = {**{f"features_{m}": ("<f4", (labels.num_utterances, None)) for m in MODALITIES},
                **{f"empty_{m}": ("<i8", (1,)) for m in MODALITIES}}
    arrays = load_cache(cached_file, stamp, expected, MAX_ABS_FEATURE) if use_cache else None
    fingerprint = cached_fingerprint(cached_file, stamp) if arrays is not None else None
    if arrays is None or fingerprint is None:
        arrays, fingerprint = _read_features(spec, labels, label_path, folders)
        if use_cache:
            save_cache(cached_file, stamp, arrays, fingerprint)
        how = "read from files"
    else:
        how = f"loaded from cache {cached_file.name}"
    _FINGERPRINTS[(str(cached_file), stamp)] = fingerprint
    log.info("%s features %s in %.2f s", spec.name, how, time.perf_counter() - started)
    _say_ignored(scan)

    empty = {m: int(arrays[f"empty_{m}"][0]) for m in MODALITIES}
    for m, count in empty.items():
        if count:
            log.warning("%s: %d of %d utterances have no %s face of their speaker; they get a "
                        "zero vector (as in GCNet)", spec.name, count, labels.num_utterances,
                        MODALITY_NAMES[m])
    offsets = np.zeros(len(labels.conversation_ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids in labels.utterance_ids])
    return MultimodalDataset(
        spec=spec, data_source=source, root=root, feature_names=names,
        conversation_ids=labels.conversation_ids, offsets=offsets,
        utterance_ids=np.array([u for ids in labels.utterance_ids for u in ids]),
        speakers=np.array([s for spk in labels.speakers for s in spk]),
        labels=np.concatenate(labels.labels),
        features={m: arrays[f"features_{m}"] for m in MODALITIES},
        folds=labels.folds, fingerprint=fingerprint, empty_faces=empty)


def _read_features(spec: DatasetSpec, labels: LabelSet, label_path: Path,
                   folders: Mapping[str, Path]) -> tuple[dict[str, np.ndarray], str]:
    """The feature arrays, and the fingerprint of the bytes they were read from."""
    utterance_ids = [u for ids in labels.utterance_ids for u in ids]
    # IEMOCAP: prefix lookup and the speaker's own face, as GCNet reads it.
    speakers = [s for spk in labels.speakers for s in spk] if spec.session_folds else None
    arrays: dict[str, np.ndarray] = {}
    with open_regular(label_path) as handle:
        parts = {"labels": hashlib.sha256(handle.read()).hexdigest()}
    for m in MODALITIES:
        content = ContentDigest()
        matrix = read_feature_folder(folders[m], utterance_ids, speakers, faces=m == "v",
                                     content=content)
        arrays[f"features_{m}"] = matrix.values
        arrays[f"empty_{m}"] = np.array([matrix.empty_faces], dtype=np.int64)
        parts[m] = f"{folders[m].name}:{content.hexdigest()}"
    return arrays, hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_SAID: set[tuple[Path, ...]] = set()  # broken links already reported by this process


def _say_ignored(scan: FileScan) -> None:
    """Once per process: the broken links below the feature folders that no utterance reads
    (one that an utterance reads stops the loading, named)."""
    if scan.broken and scan.broken not in _SAID:
        _SAID.add(scan.broken)
        shown = ", ".join(str(p) for p in scan.broken[:3])
        more = f" and {len(scan.broken) - 3} more" if len(scan.broken) > 3 else ""
        log.warning("ignoring %d broken link(s) or unreadable folder(s) that no utterance reads: "
                    "%s%s", len(scan.broken), shown, more)


def read_marker(root: Path) -> dict | None:
    """The generator's description of a synthetic dataset folder, or None for real data."""
    marker = root / SYNTHETIC_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None
