"""The dataset table: every constant that depends on the dataset name lives here, once.

Layout and sizes: docs/data.md; metrics and epoch selection: docs/method.md.
Nothing else in the project branches on a dataset name; it looks the name up here.
"""
from __future__ import annotations

from dataclasses import dataclass

class DataError(ValueError):
    """Input data that cannot be used (a missing file, a wrong shape, a non-finite value): the
    message is one sentence naming the file or flag at fault and what to do (docs/flags.md)."""


# The feature tables' keys. The model keeps its own order (MoMKE/model.py) because dataloader/
# imports nothing from MoMKE/; both are the letters a, t, v.
MODALITIES: tuple[str, ...] = ("a", "t", "v")
MODALITY_NAMES = {"a": "audio", "t": "text", "v": "visual"}

# GCNet's utterance-level features (the paper's inputs); any folder name works through flags.
DEFAULT_FEATURES = {"a": "wav2vec-large-c-UTT", "t": "deberta-large-4-UTT", "v": "manet_UTT"}


@dataclass(frozen=True)
class SplitSizes:
    """Real sizes, used to check the loader and to shape the synthetic default."""

    conversations: int
    utterances: int
    max_length: int
    split_conversations: tuple[int, ...]  # CMU: (train, val, test); IEMOCAP: per session 1..5


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # features/<folder>/
    label_file: str
    task: str  # "regression" or "classification"
    num_classes: int  # model outputs: 1 for regression
    num_folds: int
    has_validation: bool
    metrics: tuple[str, ...]  # in table order
    selection_metric: str  # the metric the official code maximises to pick its epoch
    sizes: SplitSizes
    class_names: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"


_CMU_METRICS = ("acc2", "f1", "mae", "corr", "acc7")
_IEMOCAP_METRICS = ("wa", "ua", "f1")

DATASETS: dict[str, DatasetSpec] = {
    "CMUMOSI": DatasetSpec(
        name="CMUMOSI", folder="CMUMOSI", label_file="CMUMOSI_features_raw_2way.pkl",
        task="regression", num_classes=1, num_folds=1, has_validation=True,
        metrics=_CMU_METRICS, selection_metric="f1",
        sizes=SplitSizes(93, 2199, 63, (52, 10, 31)),
    ),
    # CMU-MOSEI: totals as in docs/data.md; its split and longest video are planning figures for the
    # synthetic set (no MOSEI label file was available to count them).
    "CMUMOSEI": DatasetSpec(
        name="CMUMOSEI", folder="CMUMOSEI", label_file="CMUMOSEI_features_raw_2way.pkl",
        task="regression", num_classes=1, num_folds=1, has_validation=True,
        metrics=_CMU_METRICS, selection_metric="f1",
        sizes=SplitSizes(3229, 22856, 98, (2249, 300, 680)),
    ),
    "IEMOCAPFour": DatasetSpec(
        name="IEMOCAPFour", folder="IEMOCAP", label_file="IEMOCAP_features_raw_4way.pkl",
        task="classification", num_classes=4, num_folds=5, has_validation=False,
        metrics=_IEMOCAP_METRICS, selection_metric="wa",
        sizes=SplitSizes(151, 5531, 110, (28, 30, 32, 30, 31)),
        class_names=("hap+exc", "sad", "neu", "ang"),
    ),
    "IEMOCAPSix": DatasetSpec(
        name="IEMOCAPSix", folder="IEMOCAP", label_file="IEMOCAP_features_raw_6way.pkl",
        task="classification", num_classes=6, num_folds=5, has_validation=False,
        metrics=_IEMOCAP_METRICS, selection_metric="wa",
        sizes=SplitSizes(151, 7433, 110, (28, 30, 32, 30, 31)),
        class_names=("hap", "sad", "neu", "ang", "exc", "fru"),
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """Return the table row of `name`, or stop with a sentence that lists the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"--dataset {name!r} is unknown; use one of {', '.join(DATASETS)}."
        ) from None
