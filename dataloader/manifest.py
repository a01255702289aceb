"""Features of one's own, without labels: a folder with `manifest.csv` and GCNet feature folders.

    <folder>/manifest.csv                                  conversation,utterance[,speaker]
    <folder>/features/<feature name>/<utterance>.npy       [dim], [1, dim] or [T, dim]

One row per utterance, the utterances of a conversation in spoken order (the model attends over
the utterances of a conversation, so the order and the grouping matter); `speaker` ('F'/'M') only
where an IEMOCAP-style face folder holds the faces of both speakers. A modality whose feature
folder is absent is missing for every utterance. This is what `python -m MoMKE.predict` reads
when there is no GCNet label file (docs/evaluate.md).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from dataloader.cache import ContentDigest
from dataloader.datasets import MODALITIES, MODALITY_NAMES, DataError, DatasetSpec
from dataloader.features import read_feature_folder
from dataloader.gcnet import SYNTHETIC_MARKER, MultimodalDataset
from dataloader.labels import Fold

MANIFEST = "manifest.csv"


def load_manifest(folder: Path, spec: DatasetSpec, feature_names: Mapping[str, str]
                  ) -> MultimodalDataset:
    """The utterances of `<folder>/manifest.csv` with the features found beside it, as one test
    split of unlabelled conversations (labels are zeros and mean nothing). Modalities without
    a feature folder have no entry in `features`."""
    path = Path(folder) / MANIFEST
    rows = _read_rows(path)
    conversations: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        conversations.setdefault(row["conversation"], []).append(
            (row["utterance"], row.get("speaker") or ""))
    seen: set[str] = set()
    for ids in conversations.values():
        for uid, _ in ids:
            if uid in seen:
                raise DataError(f"{path}: utterance {uid!r} appears twice; give every utterance "
                                f"one row.")
            seen.add(uid)
    utterances = [uid for ids in conversations.values() for uid, _ in ids]
    speakers = [speaker for ids in conversations.values() for _, speaker in ids]
    faces_by_speaker = any(speakers)
    features, parts = {}, {"manifest": hashlib.sha256(path.read_bytes()).hexdigest()}
    for m in MODALITIES:
        source = Path(folder) / "features" / feature_names[m]
        if not source.is_dir():
            continue
        content = ContentDigest()
        matrix = read_feature_folder(source, utterances, speakers if faces_by_speaker else None,
                                     faces=m == "v", content=content)
        features[m] = matrix.values
        parts[m] = f"{source.name}:{content.hexdigest()}"
    if not features:
        wanted = ", ".join(f"features/{feature_names[m]}" for m in MODALITIES)
        raise DataError(f"{folder}: no feature folder found ({wanted}); put each modality's "
                        f"<utterance>.npy files there.")
    offsets = np.zeros(len(conversations) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids in conversations.values()])
    labels = np.zeros(len(utterances), np.float32 if spec.is_regression else np.int64)
    every = tuple(range(len(conversations)))
    marker = Path(folder) / SYNTHETIC_MARKER
    return MultimodalDataset(
        spec=spec, data_source="synthetic" if marker.is_file() else "real", root=Path(folder),
        feature_names=dict(feature_names), conversation_ids=tuple(conversations),
        offsets=offsets, utterance_ids=np.array(utterances), speakers=np.array(speakers),
        labels=labels, features=features, folds=(Fold("manifest", (), (), every),),
        fingerprint=hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest())


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path} not found; write one row per utterance with the columns "
                        f"conversation,utterance (docs/evaluate.md).")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"conversation", "utterance"} <= columns:
            raise DataError(f"{path}: the header must name the columns conversation and "
                            f"utterance (found {', '.join(sorted(columns)) or 'none'}).")
        rows = [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    empty = next((i for i, row in enumerate(rows, 2)
                  if not row["conversation"] or not row["utterance"]), None)
    if empty is not None:
        raise DataError(f"{path}, line {empty}: a row without its conversation or utterance id; "
                        f"fill both columns.")
    if not rows:
        raise DataError(f"{path} lists no utterance; add one row per utterance.")
    return rows


def present_modalities(data: MultimodalDataset) -> str:
    """The letters of the modalities the data has features for, e.g. 'at'."""
    return "".join(m for m in MODALITIES if m in data.features)


def describe_missing(data: MultimodalDataset) -> str:
    absent = [MODALITY_NAMES[m] for m in MODALITIES if m not in data.features]
    return ", ".join(absent) if absent else "none"
