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
class PaperSettings:
    """The paper's hyperparameters for one dataset (the official run scripts). Every run's
    defaults, the run scripts' editable values (a test holds them to this record), the report's
    "different from the paper" line, the parity harness and the benchmark read them here."""

    batch_size: int  # conversations per batch
    epochs: int  # total, stage 1 included
    stage_epochs: int  # of which stage 1
    lr: float = 1e-4
    l2: float = 1e-5
    hidden: int = 256
    depth: int = 4
    num_heads: int = 2
    mlp_ratio: float = 1.0
    drop_rate: float = 0.5
    attn_drop_rate: float = 0.0
    expert_handover: str = "best"  # stage 2 starts from each expert's best stage-1 epoch


@dataclass(frozen=True)
class OfficialEpochSeconds:
    """The official code's seconds per epoch (stage 1; stage 2, condition atv) and hours for the
    seven-condition table at the paper's epochs, measured on a 2-core CPU (docs/precision-and-
    speed.md, dated): what `python -m MoMKE.bench` quotes when it does not run that code itself."""

    stage1: float
    stage2: float
    table_hours: float


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
    paper: PaperSettings
    peak_memory_gb: float  # peak resident memory of one CPU run (python -m MoMKE.bench, synthetic
    # data at the real sizes, float32 and bfloat16 alike within 5 %): sizes a local pool
    class_names: tuple[str, ...] = ()
    official_seconds: OfficialEpochSeconds | None = None

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def session_folds(self) -> bool:
        """IEMOCAP's leave-one-session-out folds: a conversation's session is the fifth character
        of its id, and each utterance's features are looked up by prefix with its speaker's face."""
        return self.num_folds > 1


_CMU_METRICS = ("acc2", "f1", "mae", "corr", "acc7")
_IEMOCAP_METRICS = ("wa", "ua", "f1")

DATASETS: dict[str, DatasetSpec] = {
    "CMUMOSI": DatasetSpec(
        name="CMUMOSI", folder="CMUMOSI", label_file="CMUMOSI_features_raw_2way.pkl",
        task="regression", num_classes=1, num_folds=1, has_validation=True,
        metrics=_CMU_METRICS, selection_metric="f1",
        sizes=SplitSizes(93, 2199, 63, (52, 10, 31)),
        paper=PaperSettings(batch_size=32, epochs=300, stage_epochs=150), peak_memory_gb=0.75,
        official_seconds=OfficialEpochSeconds(stage1=1.44, stage2=3.6, table_hours=1.3),
    ),
    # CMU-MOSEI: totals as in docs/data.md; its split and longest video are planning figures for the
    # synthetic set (no MOSEI label file was available to count them).
    "CMUMOSEI": DatasetSpec(
        name="CMUMOSEI", folder="CMUMOSEI", label_file="CMUMOSEI_features_raw_2way.pkl",
        task="regression", num_classes=1, num_folds=1, has_validation=True,
        metrics=_CMU_METRICS, selection_metric="f1",
        sizes=SplitSizes(3229, 22856, 98, (2249, 300, 680)),
        paper=PaperSettings(batch_size=32, epochs=100, stage_epochs=50), peak_memory_gb=1.6,
    ),
    "IEMOCAPFour": DatasetSpec(
        name="IEMOCAPFour", folder="IEMOCAP", label_file="IEMOCAP_features_raw_4way.pkl",
        task="classification", num_classes=4, num_folds=5, has_validation=False,
        metrics=_IEMOCAP_METRICS, selection_metric="wa",
        sizes=SplitSizes(151, 5531, 110, (28, 30, 32, 30, 31)),
        paper=PaperSettings(batch_size=16, epochs=200, stage_epochs=100), peak_memory_gb=0.9,
        class_names=("hap+exc", "sad", "neu", "ang"),
        official_seconds=OfficialEpochSeconds(stage1=3.3, stage2=8.6, table_hours=11.5),
    ),
    "IEMOCAPSix": DatasetSpec(
        name="IEMOCAPSix", folder="IEMOCAP", label_file="IEMOCAP_features_raw_6way.pkl",
        task="classification", num_classes=6, num_folds=5, has_validation=False,
        metrics=_IEMOCAP_METRICS, selection_metric="wa",
        sizes=SplitSizes(151, 7433, 110, (28, 30, 32, 30, 31)),
        paper=PaperSettings(batch_size=16, epochs=200, stage_epochs=100), peak_memory_gb=1.0,
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
