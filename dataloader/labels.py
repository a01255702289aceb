"""Parse a GCNet label file into conversations, labels, speakers and splits, checking its shape.

See docs/data.md. CMU files are 7-tuples (ids, labels, speakers, sentences, train, val, test);
IEMOCAP files are 6-tuples (ids, labels, speakers, sentences, train, test), evaluated with five
leave-one-session-out folds (session = 5th character of the dialogue id), as the official code does.
Split members come as Python sets; they are sorted here so that no run depends on hash order.
"""
from __future__ import annotations

import logging
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dataloader.datasets import DataError, DatasetSpec
from dataloader.files import open_regular

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fold:
    """Conversation indices (into `LabelSet.conversation_ids`) of one train/val/test split."""

    name: str
    train: tuple[int, ...]
    val: tuple[int, ...]  # empty where the dataset has no validation split
    test: tuple[int, ...]


@dataclass(frozen=True)
class LabelSet:
    conversation_ids: tuple[str, ...]  # sorted
    utterance_ids: tuple[tuple[str, ...], ...]  # per conversation, in spoken order
    labels: tuple[np.ndarray, ...]  # per conversation: float32 (regression) or int64 (classes)
    speakers: tuple[tuple[str, ...], ...]
    folds: tuple[Fold, ...]

    @property
    def num_utterances(self) -> int:
        return sum(len(ids) for ids in self.utterance_ids)


def read_label_file(path: str | Path, spec: DatasetSpec) -> LabelSet:
    """Load and validate the label file of `spec` at `path` (see the module docstring)."""
    path = Path(path)
    content = load_label_pickle(path)
    expected = 7 if spec.has_validation else 6
    if not isinstance(content, (list, tuple)) or len(content) != expected:
        got = f"a {type(content).__name__} of length {len(content)}" if hasattr(content, "__len__") \
            else f"a {type(content).__name__}"
        raise DataError(
            f"{path}: expected a {expected}-tuple (ids, labels, speakers, sentences, "
            f"{'train, val, test' if spec.has_validation else 'train, test'}) for {spec.name} "
            f"but found {got}; check that the file belongs to {spec.name}."
        )
    video_ids, video_labels, video_speakers = content[0], content[1], content[2]
    split_sets = content[4:]
    for name, value in (("ids", video_ids), ("labels", video_labels), ("speakers", video_speakers)):
        if not isinstance(value, dict):
            raise DataError(f"{path}: the {name} entry should be a dict keyed by conversation id, "
                            f"found {type(value).__name__}; replace the file with a GCNet label file.")
    conversation_ids = tuple(sorted(video_ids))
    utterances, labels, speakers = [], [], []
    for vid in conversation_ids:
        ids = tuple(str(u) for u in video_ids[vid])
        if vid not in video_labels or vid not in video_speakers:
            raise DataError(f"{path}: conversation {vid!r} has utterance ids but no labels or "
                            f"speakers; the file is incomplete, replace it.")
        values = np.asarray(video_labels[vid])
        spk = tuple(str(s) for s in video_speakers[vid])
        if len(ids) == 0 or values.shape != (len(ids),) or len(spk) != len(ids):
            raise DataError(
                f"{path}: conversation {vid!r} has {len(ids)} utterance ids, {values.size} labels "
                f"and {len(spk)} speakers; they must be equal and non-zero, replace the file.")
        utterances.append(ids)
        labels.append(values)
        speakers.append(spk)
    labels = _checked_labels(labels, spec, path, conversation_ids)
    index = {vid: i for i, vid in enumerate(conversation_ids)}
    splits = []
    for name, members in zip(("train", "val", "test") if spec.has_validation else ("train", "test"),
                             split_sets):
        odd = members if not isinstance(members, (set, frozenset, list, tuple)) else next(
            (vid for vid in members if not isinstance(vid, str)), None)
        if odd is not None:
            raise DataError(f"{path}: the {name} split must be a set of conversation ids "
                            f"(strings), but holds {type(odd).__name__} {str(odd)[:40]!r}; "
                            f"replace the file with a GCNet label file.")
        unknown = sorted(set(members) - set(index))
        if unknown:
            raise DataError(f"{path}: the {name} split names conversations without ids, e.g. "
                            f"{unknown[0]!r}; the file is inconsistent, replace it.")
        splits.append(tuple(sorted(index[vid] for vid in members)))
    folds = _folds(spec, conversation_ids, splits, path)
    for fold in folds:
        _check_fold(fold, conversation_ids, path, named=len(folds) > 1)
    _say_unused(folds, conversation_ids, utterances, path)
    return LabelSet(conversation_ids, tuple(utterances), tuple(labels), tuple(speakers), folds)


def _check_fold(fold: Fold, conversation_ids: tuple[str, ...], path: Path, *, named: bool) -> None:
    """Refuse, before any training, a fold whose splits would train on what it tests, train on
    a conversation twice per epoch, or train or test on nothing."""
    where = f"fold {fold.name!r}: " if named else ""
    splits = {"train": fold.train, "val": fold.val, "test": fold.test}

    def some(indices: Iterable[int]) -> str:
        ids = [repr(conversation_ids[i]) for i in sorted(set(indices))]
        return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")

    for name, members in splits.items():
        repeated = [i for i, count in Counter(members).items() if count > 1]
        if repeated:
            raise DataError(f"{path}: {where}the {name} split lists {some(repeated)} more than "
                            f"once; list each conversation once (a repeat is trained or scored "
                            f"twice).")
    for first, second in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = set(splits[first]) & set(splits[second])
        if shared:
            raise DataError(f"{path}: {where}{some(shared)} {'is' if len(shared) == 1 else 'are'} "
                            f"in both the {first} and the {second} split; each conversation "
                            f"belongs to one split, fix the file.")
    for name in ("train", "test"):
        if not splits[name]:
            raise DataError(f"{path}: {where}the {name} split is empty; a run needs conversations "
                            f"to {'train on' if name == 'train' else 'test on'}, fix the file.")


def _say_unused(folds: tuple[Fold, ...], conversation_ids: tuple[str, ...],
                utterances: list[tuple[str, ...]], path: Path) -> None:
    """One warning when some conversations are in no split of any fold: a run neither trains,
    validates nor tests on them, which may be intended (a held-out set) or a damaged file."""
    used = {i for fold in folds for split in (fold.train, fold.val, fold.test) for i in split}
    unused = [i for i in range(len(conversation_ids)) if i not in used]
    if unused:
        shown = ", ".join(repr(conversation_ids[i]) for i in unused[:3])
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        log.warning("%s: %d conversation(s) with %d utterance(s) are in no split and are never "
                    "trained or tested on: %s%s", path, len(unused),
                    sum(len(utterances[i]) for i in unused), shown, more)


def _checked_labels(per_conversation: list[np.ndarray], spec: DatasetSpec, path: Path,
                    conversation_ids: tuple[str, ...]) -> list[np.ndarray]:
    """Check all labels at once; name the first conversation with a bad one."""
    try:
        flat = np.concatenate(per_conversation)
        numeric = flat.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: labels must be numbers; the file is not a GCNet label file.") \
            from None
    if spec.is_regression:
        bad = ~np.isfinite(numeric) | (np.abs(numeric) > 3.0)
        rule = "finite sentiment scores in [-3, 3]; the file is not a CMU label file"
        dtype = np.float32
    else:
        bad = (numeric != np.round(numeric)) | (numeric < 0) | (numeric >= spec.num_classes)
        rule = (f"class indices 0..{spec.num_classes - 1} for {spec.name}; check that the file "
                f"matches the dataset")
        dtype = np.int64
    if bad.any():
        owner = np.searchsorted(np.cumsum([len(v) for v in per_conversation]), np.argmax(bad),
                                side="right")
        raise DataError(f"{path}: labels of {conversation_ids[owner]!r} must be {rule}.")
    bounds = np.cumsum([len(v) for v in per_conversation])[:-1]
    return np.split(numeric.astype(dtype), bounds)


def _folds(spec: DatasetSpec, conversation_ids: tuple[str, ...], splits: list[tuple[int, ...]],
           path: Path) -> tuple[Fold, ...]:
    if not spec.session_folds:
        train, val, test = splits
        return (Fold("official split", train, val, test),)
    sessions: dict[str, list[int]] = {}
    for i, vid in enumerate(conversation_ids):
        sessions.setdefault(vid[4:5], []).append(i)
    if len(sessions) != spec.num_folds:
        raise DataError(f"{path}: found sessions {sorted(sessions)} in the dialogue ids (5th "
                        f"character) but {spec.name} needs {spec.num_folds}; replace the file.")
    folds = []
    for session in sorted(sessions):
        test = tuple(sessions[session])
        train = tuple(i for s in sorted(sessions) if s != session for i in sessions[s])
        folds.append(Fold(f"session {session}", train, (), test))
    return tuple(folds)


# ----------------------------------------------------------------------------- safe unpickling
# Load GCNet label pickles without letting them run code.
# 
# A pickle names the functions it calls while loading; this unpickler admits only
# builtin containers and the few numpy names that rebuild arrays and scalars, and refuses anything
# else before it is imported, so nothing in a hostile file runs.

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(module, name) for module in ("builtins", "__builtin__")  # __builtin__: protocol-2 files
     for name in ("list", "dict", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "bool", "complex", "slice", "range")]
    + [("collections", "OrderedDict"), ("_codecs", "encode")]  # protocol-2 files store bytes via encode
    + [(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("numpy.dtypes", name) for name in (
        "Float64DType", "Float32DType", "Int64DType", "Int32DType", "StrDType", "BoolDType",
        "ObjectDType")]
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self._path}: refused to load this label file because it asks to import "
                f"{module}.{name}; label files may hold only lists, dicts, sets, strings, numbers "
                f"and numpy arrays, so use the GCNet label file or re-save yours with those types."
            )
        return super().find_class(module, name)


def load_label_pickle(path: str | Path) -> Any:
    """Unpickle `path` admitting only builtin containers and numpy arrays/scalars."""
    path = Path(path)
    try:
        with open_regular(path) as handle:
            return _RestrictedUnpickler(handle, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"{path}: label file not found; put the GCNet label file there or generate the "
            f"synthetic set with `python -m dataloader.synthetic`."
        ) from None
    except Exception as error:  # any parse failure of a corrupt or foreign file
        raise DataError(
            f"{path}: cannot be read as a pickle ({type(error).__name__}: {error}); "
            f"replace it with an intact GCNet label file."
        ) from None
