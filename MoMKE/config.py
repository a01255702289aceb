"""Training configuration: dataclass defaults, then a YAML file, then command-line flags.

docs/flags.md lists them. Every field is a `--kebab-case` flag with help text and may also be a key
of `--config FILE.yaml` (kebab- or snake-case); flags override the file. Unknown keys and wrong types
stop with a sentence naming the key. Fields left unset that the paper fixes (`PAPER_FIELDS`: batch
size, epochs, learning rate, sizes, dropout, ...) take the paper's value for the chosen dataset from
its record in the dataset table, and the resolved value is printed and saved, so nothing is
overridden silently.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from dataloader.datasets import DATASETS, DEFAULT_FEATURES, PaperSettings, get_spec
from MoMKE.protocols import parse_condition, parse_rate

ABLATIONS = ("no-stage1", "uniform-router", "self-experts", "frozen-experts")  # see the end

# The fields whose default is the paper's value for the chosen dataset, from its record in the
# dataset table (`DatasetSpec.paper`); left unset, `resolved` fills them.
PAPER_FIELDS = tuple(f.name for f in dataclasses.fields(PaperSettings))


# Default --chunk-utterances: float32 runs fastest with small chunks on the CPU, bfloat16 matrix
# products with whole batches (measured: MoMKE.bench, docs/precision-and-speed.md). A GPU is
# bound by kernel launches, not memory, at MoMKE's sizes: there a batch runs whole (0).
CHUNK_UTTERANCES, AMP_CHUNK_UTTERANCES, CUDA_CHUNK_UTTERANCES = 256, 1024, 0


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the flag or key."""


STAGE1, NOT_STAGE1 = True, False  # a field's first word: does it touch stage 1?


def _option(stage1: bool | Callable[["TrainConfig"], Any], help: str,
            **argparse_options: Any) -> Any:
    """A field with its flag's help and argparse options, and `stage1`: whether it can change
    anything a cached stage 1 holds (True: its value is part of the stage-1 key; a function: the
    part of the key it gives, from the resolved configuration; False: never; docs/runs.md)."""
    return field(default=argparse_options.pop("default", None),
                 metadata={"help": help, "stage1": stage1, **argparse_options})


def _ablation_in_stage1(config: "TrainConfig") -> Any:
    """Stage 1 trains the same parameters for every ablation; only with --select-from all does
    it also run the fused head (to score its epochs as candidates), whose output the ablation's
    model options change."""
    return model_options(config.ablation) if config.select_from == "all" else None


@dataclass
class TrainConfig:
    # The first argument of each field says whether it touches stage 1 (`_option`). Not in the
    # stage-1 key, though stage 1 reads them: data_root (the data fingerprint stands for the data
    # found there), test_condition and missing_rate (the setting's own stage-1 key: the rate, in
    # the random protocol), folds (each fold is its own key), device (the resolved device's type
    # is in the key). Never read by stage 1: epochs (stage 2's end), official (it acts through
    # select_from and expert_handover), train_missing (stage-2 masks; stage 1 trains and is
    # evaluated on complete data), the output and reuse options.
    # data
    dataset: str | None = _option(STAGE1, "dataset to train on", choices=list(DATASETS))
    data_root: str = _option(NOT_STAGE1, "folder holding <DIR>/ in the GCNet layout",
                             default="features")
    audio_feature: str = _option(STAGE1, "audio feature folder name",
                                 default=DEFAULT_FEATURES["a"])
    text_feature: str = _option(STAGE1, "text feature folder name",
                                default=DEFAULT_FEATURES["t"])
    video_feature: str = _option(STAGE1, "visual feature folder name",
                                 default=DEFAULT_FEATURES["v"])
    # missing-modality protocol
    test_condition: list[str] | None = _option(
        NOT_STAGE1,
        "fixed protocol: comma list of conditions among a,t,v,at,av,tv,atv; one model each "
        "(default atv when no --missing-rate is given)")
    missing_rate: list[float] | None = _option(
        NOT_STAGE1,
        "random protocol: comma list of missing rates in [0, 0.7]; one model each")
    # schedule and optimiser
    epochs: int | None = _option(NOT_STAGE1, "total epochs, stage 1 included")
    stage_epochs: int | None = _option(STAGE1, "epochs of stage 1, unimodal expert training; 0 "
                                       "skips it (half of --epochs when only that is given)")
    batch_size: int | None = _option(STAGE1, "conversations per batch")
    lr: float | None = _option(STAGE1, "Adam learning rate, both stages")
    l2: float | None = _option(STAGE1, "Adam weight decay, both stages")
    chunk_utterances: int | None = _option(
        STAGE1,
        "largest number of utterances run through the model at once: a batch with more is "
        "split into chunks of whole conversations whose gradients add up to the batch's (the "
        "same update, less memory; 0: the whole batch at once; default on the CPU: 256, or 1024 "
        "with --amp, whose bfloat16 matrix products need larger blocks to run at speed; on a "
        "GPU: 0)")
    expert_handover: str | None = _option(
        STAGE1,
        "stage-1 weights stage 2 starts from: best (each modality's best stage-1 epoch, the "
        "paper's intent) or last (what the released code effectively does)",
        choices=["best", "last"])
    select_from: str = _option(
        STAGE1,
        "epochs the selection rules choose among: stage2 (the fused model's epochs, the default) "
        "or all (stage-1 epochs too, whose val/test pass runs the untrained fused head on the "
        "stage-1 masks, as the official code does)", default="stage2", choices=["stage2", "all"])
    official: bool = _option(
        NOT_STAGE1,
        "the official code's choices where ours differ: --select-from all and --expert-handover "
        "last (the report then shows MAE and Corr on non-zero labels)", default=False)
    train_missing: str = _option(
        NOT_STAGE1,
        "stage-2 training masks: run (the run's own condition or rate, the paper), any (one "
        "unified model: each conversation gets one of the seven conditions; evaluated on all "
        "conditions and rates), any+rates (as any, half the conversations with random per-"
        "utterance masks at a rate in [0, 0.7])", default="run", choices=["run", "any", "any+rates"])
    ablation: str = _option(
        _ablation_in_stage1,
        "change one thing of MoMKE: none; no-stage1 (the mixture trained from scratch: stage 1 "
        "skipped, stage 2 as long as usual); uniform-router (equal weights over the experts, "
        "nothing learnt); self-experts (each modality uses its own expert only: no cross-expert "
        "knowledge); frozen-experts (experts keep their stage-1 weights in stage 2)",
        default="none", choices=["none", *ABLATIONS])
    # model
    hidden: int | None = _option(STAGE1, "hidden size D")
    depth: int | None = _option(STAGE1, "layers per expert")
    num_heads: int | None = _option(STAGE1, "attention heads per expert layer")
    mlp_ratio: float | None = _option(STAGE1, "expert MLP width as a multiple of D")
    drop_rate: float | None = _option(STAGE1, "dropout of projections, MLPs, routers and fusion")
    attn_drop_rate: float | None = _option(STAGE1, "dropout of attention weights")
    bit_dropout: bool = _option(
        STAGE1,
        "CPU dropout masks from random bits (MoMKE/model.py BitDropout): the same Bernoulli keep "
        "rate and scale as nn.Dropout, another random stream, faster CPU epochs "
        "(docs/precision-and-speed.md); --no-bit-dropout uses nn.Dropout everywhere", default=True)
    # run
    seed: int = _option(STAGE1, "random seed (data order, masks, initialisation, dropout)",
                        default=66)
    folds: list[int] | None = _option(NOT_STAGE1, "comma list of folds to run, 1-based (default: "
                                      "all; IEMOCAP has 5 sessions)")
    device: str = _option(NOT_STAGE1, "auto, cpu or cuda[:N]; auto takes CUDA when available",
                          default="auto")
    threads: int = _option(STAGE1, "CPU threads of torch during a run (torch.set_num_threads); "
                           "0: torch's default, the machine's cores. Float rounding on the CPU "
                           "can depend on it: compare runs at equal --threads (Ray runs default "
                           "to --cpus-per-run)", default=0)
    amp: bool = _option(
        STAGE1,
        "bfloat16 autocast of the forward pass, on CUDA and on CPUs with bfloat16 arithmetic in "
        "hardware (AVX-512 BF16, AMX, ARM BF16): weights, optimiser state, softmaxes, losses and "
        "metrics stay float32. Elsewhere it is said once and the run is float32 (and recorded so). "
        "Parity with float32 and the speed-up: docs/precision-and-speed.md", default=False)
    compile: bool = _option(
        STAGE1,
        "torch.compile the expert stack (dynamic shapes: one compilation serves every batch size). "
        "Its speed and compilation time: docs/precision-and-speed.md; on the CPU --bit-dropout "
        "draws the same dropout masks inside it as in eager runs", default=False)
    output_dir: str = _option(NOT_STAGE1, "where run folders are written", default="saved")
    # A cached stage 1 holds the best stage-1 checkpoint when it keeps one (--select-from all).
    save_checkpoint: bool = _option(STAGE1, "write the selected checkpoint of every fold",
                                    default=True)
    reuse_stage1: bool = _option(NOT_STAGE1, "reuse a stage 1 trained with identical settings "
                                 "(cached under <output-dir>/_stage1)", default=True)
    force: bool = _option(NOT_STAGE1, "retrain even when a complete run with this configuration "
                          "exists", default=False)
    config: str | None = _option(NOT_STAGE1, "YAML file of any of these keys; flags override it")

    def resolved(self) -> "TrainConfig":
        """Fill the paper's per-dataset values and check every field; raise ConfigError."""
        if self.dataset is None:
            raise ConfigError("--dataset is required (or set `dataset:` in --config); use one of "
                              f"{', '.join(DATASETS)}.")
        try:
            get_spec(self.dataset)
            conditions = [parse_condition(c) for c in self.test_condition or []]
            rates = [parse_rate(r) for r in self.missing_rate or []]
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.test_condition is None and self.missing_rate is None:
            conditions = ["atv"]
        elif not conditions and not rates and self.train_missing == "run":
            given = [flag for flag, value in (("--test-condition", self.test_condition),
                                              ("--missing-rate", self.missing_rate))
                     if value is not None]
            raise ConfigError(f"{' and '.join(given)} {'list' if len(given) > 1 else 'lists'} "
                              f"nothing to run; give at least one condition (e.g. "
                              f"--test-condition atv) or rate (e.g. --missing-rate 0.3).")
        paper = get_spec(self.dataset).paper
        unset = {name: getattr(paper, name) for name in PAPER_FIELDS
                 if getattr(self, name) is None}
        epochs, stage = paper.epochs, paper.stage_epochs
        if self.epochs is not None:
            epochs, stage = self.epochs, self.epochs // 2
        if self.stage_epochs is not None:
            stage = self.stage_epochs
        official = dict(select_from="all", expert_handover="last") if self.official else {}
        chunk = self.chunk_utterances
        if chunk is None:
            chunk = CUDA_CHUNK_UTTERANCES if _on_cuda(self.device) else \
                AMP_CHUNK_UTTERANCES if self.amp else CHUNK_UTTERANCES
        out = dataclasses.replace(self, **{**unset, "test_condition": conditions,
                                           "missing_rate": rates, "epochs": epochs,
                                           "stage_epochs": stage, "chunk_utterances": chunk,
                                           **official})
        out._check()
        return out

    def _check(self) -> None:
        for flag, value, zero in (("threads", self.threads, "torch's default"),
                                  ("chunk-utterances", self.chunk_utterances, "the whole batch")):
            if value < 0:
                raise ConfigError(f"--{flag} {value} must be 0 ({zero}) or a positive number.")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "hidden": self.hidden,
                    "depth": self.depth, "num_heads": self.num_heads}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be at least 1.")
        if not 0 <= self.stage_epochs < self.epochs:
            raise ConfigError(f"--stage-epochs {self.stage_epochs} must be in [0, --epochs "
                              f"{self.epochs}): stage 2 needs at least one epoch.")
        for name in ("drop_rate", "attn_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1).")
        if self.hidden % self.num_heads:
            raise ConfigError(f"--hidden {self.hidden} must be divisible by --num-heads "
                              f"{self.num_heads}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr} must be a positive number, e.g. 1e-4.")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ConfigError(f"--l2 {self.l2} must be a non-negative number, e.g. 1e-5.")
        if not (math.isfinite(self.mlp_ratio) and int(self.hidden * self.mlp_ratio) >= 1):
            raise ConfigError(f"--mlp-ratio {self.mlp_ratio} must be positive (the expert MLP "
                              f"has --hidden x --mlp-ratio units, at least 1), e.g. 1.")
        check_seed(self.seed)
        if self.select_from == "all" and self.train_missing != "run":
            raise ConfigError("--select-from all applies to one model per condition or rate; "
                              "use --select-from stage2 with --train-missing any.")
        if self.folds is not None:
            count = get_spec(self.dataset).num_folds
            if not self.folds or any(not 1 <= k <= count for k in self.folds):
                raise ConfigError(f"--folds {self.folds} must list fold numbers in 1..{count} for "
                                  f"{self.dataset}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage1_settings(self) -> dict[str, Any]:
        """What of this resolved configuration a stage 1 can depend on: each field marked
        STAGE1 with its value, each marked with a function with what that function gives."""
        out = {}
        for spec in dataclasses.fields(self):
            touches = spec.metadata["stage1"]
            if touches is not NOT_STAGE1:
                out[spec.name] = getattr(self, spec.name) if touches is STAGE1 else touches(self)
        return out


MAX_SEED = 2**32 - 1  # numpy's seed range; fold seeds add 1000 per fold, still within torch's


def check_seed(seed: int) -> int:
    """`seed`, or a ConfigError when it is outside [0, MAX_SEED]."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed} is outside [0, {MAX_SEED}]; use e.g. 66.")
    return seed


# ----------------------------------------------------------------------------- parsing

def _split(text: Any) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    return [t for t in str(text).replace(" ", "").split(",") if t]


_LIST_PARSERS = {"test_condition": str, "missing_rate": float, "folds": int}


def _convert(name: str, value: Any, source: str) -> Any:
    """Coerce `value` to the type of field `name`, or raise ConfigError naming `source`."""
    default = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = default.type
    try:
        if value is None:
            return None
        if name in _LIST_PARSERS:
            return [_LIST_PARSERS[name](v) for v in _split(value)]
        if "bool" in kind:
            if isinstance(value, bool):
                return value
            raise TypeError
        if "int" in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if "float" in kind:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name.replace('_', '-')} = {value!r} is not a valid "
                          f"{kind.split(' |')[0]}.") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m MoMKE.train", allow_abbrev=False,
        description="Train and evaluate MoMKE (two stages) under the fixed or random "
                    "missing-modality protocol; one run folder per condition or rate.")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        meta = dict(spec.metadata)
        help_text = meta.pop("help")
        meta.pop("stage1")
        if "bool" in spec.type:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {'on' if spec.default else 'off'})")
            continue
        if spec.name in PAPER_FIELDS:
            help_text += f" (default: {_paper_values(spec.name)})"
        elif spec.default is not None:
            help_text += f" (default: {spec.default})"
        parser.add_argument(flag, default=None, help=help_text, **meta)
    return parser


def _paper_values(name: str) -> str:
    """The paper's value of field `name` for the help text: one value, or one per dataset."""
    values = {dataset: getattr(spec.paper, name) for dataset, spec in DATASETS.items()}
    if len(set(values.values())) == 1:
        return f"the paper's, {next(iter(values.values()))}"
    return "the paper's: " + ", ".join(f"{d} {v}" for d, v in values.items())


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the --config file, then the flags given; resolved and checked."""
    args = vars(build_parser().parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if args.get("config"):
        values.update(_read_yaml(Path(args["config"])))
    for name, value in args.items():
        if value is not None:
            values[name] = _convert(name, value, "--" + name.replace("_", "-"))
    return TrainConfig(**values).resolved()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--config {path}: cannot be read ({error}).") from None
    if not isinstance(content, dict):
        raise ConfigError(f"--config {path}: must be a mapping of option names to values.")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"config"}
    values = {}
    for key, value in content.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}; keys are the flag names of "
                              f"`python -m MoMKE.train --help`.")
        values[name] = _convert(name, value, f"--config {path}")
    return values


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- ablations and variants
# The ablations that explain MoMKE, each one value of `--ablation` that changes one thing (its
# help text says what). All but no-stage1 train stage 1 as MoMKE does (the same parameters are created in the same order),
# so they reuse MoMKE's stage 1; with --select-from all each stage-1 epoch also runs the fused head,
# which uniform-router and self-experts change, so there they train their own
# (`_ablation_in_stage1`). The unified model (`--train-missing any`) is not an ablation but a
# different training regime; both are named by `variant_name`.


def model_options(ablation: str) -> dict[str, str]:
    """The ModelConfig fields an ablation sets."""
    return {"router": "uniform" if ablation == "uniform-router" else "soft",
            "experts": "self" if ablation == "self-experts" else "all"}


def has_stage1(config: TrainConfig) -> bool:
    return config.stage_epochs > 0 and config.ablation != "no-stage1"


def variant_name(config: dict) -> str:
    """'MoMKE', an ablation name, or 'unified (any)' for a result's configuration."""
    if config.get("train_missing", "run") != "run":
        return f"unified ({config['train_missing']})"
    return "MoMKE" if config.get("ablation", "none") == "none" else config["ablation"]


def _on_cuda(device: str) -> bool:
    """Whether --device `device` runs on a GPU (auto: when torch sees one)."""
    if device == "auto":
        import torch  # here only: parsing flags needs no torch otherwise

        return torch.cuda.is_available()
    return device.startswith("cuda")
