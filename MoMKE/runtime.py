"""Where a run executes: device choice, bfloat16 autocast, and peak memory.

The CPU path is the reference; CUDA runs the same code. `--amp` wraps the forward pass in bfloat16
autocast on either device: matrix products run in bfloat16, while weights, optimiser state,
softmaxes, losses and metrics stay in float32. A CPU without bfloat16 arithmetic in hardware, or a
GPU older than Ampere, would emulate it, slower than float32, so there `--amp` says so once and
runs float32.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import resource
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

from dataloader.source import READING_MODULES, source_digest

# oneDNN, which runs the CPU's bfloat16 products, keeps up to 1,024 compiled kernels per cache, one
# per matrix shape. Batch shapes vary from batch to batch, so those caches grew a bfloat16 CMU-MOSI
# run's resident memory to 1.4 GB in 24 epochs (float32: 0.8 GB); 16 entries keep it at 0.73 GB
# with the same losses. Cost, 4 paired whole-process runs of 8 epochs: wall time x1.06 median
# (0.97-1.08), within this machine's noise; 128 entries were no faster. Read when oneDNN first
# runs, so set before any product; a user's value wins.
for _variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, "16")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu'; 'cuda' or 'cuda:N' (checked).

    A GPU comes back with its index ('cuda' and 'auto' name the current one), with CUDA started
    and that GPU made current: later calls that name it by index (peak-memory statistics) find
    CUDA initialised, and calls that use the current GPU (pinned memory, seeding) open no second
    context on GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asks for CUDA, but this torch build sees no GPU; "
                             f"use --device cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible.")
        torch.cuda.init()
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"--device {name!r}: use auto, cpu or cuda:N.")
    return device


def hardware(device: torch.device) -> dict[str, str | None]:
    """What a run's numbers depend on in the machine it ran on (docs/runs.md): the device type,
    and on a GPU its model and the CUDA version. The CPU and CUDA draw dropout from different
    generators and autocast keeps different operations in float32 on each, so these change the
    numbers beyond rounding; the GPU's index does not."""
    if device.type != "cuda":
        return {"device": device.type}
    if not torch.cuda.is_available():  # a driver planning runs for GPUs that only its nodes have
        return {"device": "cuda", "gpu": None, "cuda": torch.version.cuda}
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` when `enabled` (and, on the CPU, supported), else nothing."""
    if enabled and amp_active(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def amp_active(device: torch.device) -> bool:
    """Whether `--amp` takes effect on `device` (`bf16_supported`); said once, in the log, where
    it does not."""
    if bf16_supported(device):
        return True
    _say_no_bf16()
    return False


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` does bfloat16 arithmetic in hardware: a GPU of compute capability 8.0
    (Ampere) or later, and the CPUs of `cpu_has_bf16`. Older GPUs emulate it, slower than
    float32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_bf16()


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (x86: AVX-512 BF16 or AMX; ARM:
    the BF16 extension)."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these probes: assume the worst
        native = False
    if not native and platform.machine().lower() in ("aarch64", "arm64"):
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return native


@lru_cache(maxsize=1)
def _say_no_bf16() -> None:
    logging.getLogger("MoMKE").warning(
        "--amp: this device has no bfloat16 arithmetic in hardware (a CPU without AVX-512 BF16, "
        "AMX or ARM BF16, or a GPU older than compute capability 8.0), where bfloat16 would be "
        "slower than float32; running float32.")


def compile_experts(model: torch.nn.Module) -> None:
    """`torch.compile` each expert of `model` in place (parameter names unchanged), with dynamic
    shapes: the numbers of tokens and packed rows change from batch to batch, and one
    compilation per grad mode serves them all instead of one per shape."""
    for expert in model.experts.values():
        expert.compile(dynamic=True)


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count of a run or fold afresh: on a GPU only (a process's peak
    resident set size cannot be reset; `peak_memory` says so)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak CUDA memory allocated on a GPU since `reset_peak_memory`, or the peak resident set
    size of the whole process on the CPU (every earlier run of the process included)."""
    if device.type == "cuda":
        return {"device": str(device), "memory": "peak_cuda_allocated",
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"device": "cpu", "memory": "peak_rss_of_process",
            "peak_memory_mb": peak * scale / 2**20}


# What the code version covers: the modules on the path from the data on disk to a metric in a
# result, each as its syntax tree (docs/runs.md). dataloader/: reading, checking and batching the
# data (`READING_MODULES`; not atomic.py, which only writes files, nor synthetic.py, whose output
# the data fingerprint covers, nor manifest.py, which only `python -m MoMKE.predict` reads);
# MoMKE/: the model, token layout, protocols, metrics, selection, the evaluation pass, training,
# one run, the configuration, the stage-1 cache, the checkpoint it writes, this module and the
# command that runs them (not memory.py, which only refuses a run before it starts); of runlog.py only the run identity (the
# rest writes files, locks and logs). Not covered: MoMKE/experiments/ and MoMKE/results/ (they
# plan, schedule, evaluate saved runs or present them) and the thin entry points that call them.
_COMPUTES: dict[str, tuple[str, ...] | None] = {  # path -> top-level names kept, None: all
    **{f"dataloader/{name}.py": None for name in READING_MODULES},
    **{f"MoMKE/{name}.py": None for name in ("checkpoint", "config", "evaluation", "layout",
                                               "metrics", "model", "protocols",
                                               "runner", "runtime", "selection", "stage1_cache",
                                               "train", "trainer")},
    "MoMKE/runlog.py": ("_NOT_IN_IDENTITY", "VARIANT_FIELDS", "_digest", "run_identity",
                        "identity_hash", "experiment_hash", "run_folder"),
}
_NOT_COMPUTING = frozenset({"dataloader/__init__.py", "dataloader/atomic.py",
                            "dataloader/manifest.py", "dataloader/synthetic.py",
                            "MoMKE/__init__.py", "MoMKE/bench.py", "MoMKE/evaluate.py",
                            "MoMKE/memory.py",
                            "MoMKE/parity.py", "MoMKE/predict.py", "MoMKE/report.py",
                            "MoMKE/sweep.py"})


@lru_cache(maxsize=1)
def code_version() -> str:
    """The digest (`source_digest`) of the code that computes a result (`_COMPUTES`): part of a
    run's identity and of the stage-1 cache key, so results of changed code are never reused,
    while a changed comment or docstring retrains nothing. It also changes with the Python
    version, whose syntax trees may differ: a false retrain is cheap, a stale result is not."""
    root = Path(__file__).resolve().parents[1]
    sources = {name: (root / name).read_text(encoding="utf-8") for name in _COMPUTES}
    return source_digest(sources, _COMPUTES)


@lru_cache(maxsize=1)
def source_version() -> str:
    """The git commit of this checkout (with '-dirty' when files differ), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


class HeapTrimmer:
    """Hands freed heap memory back to the system when the process has grown by `slack_mb`.

    Each batch allocates tensors of slightly different sizes and glibc keeps the freed blocks,
    so without this a long CPU run's resident memory creeps up epoch after epoch (seen: +350 MB
    over 40 CMU-MOSI epochs) although its live memory does not. Trimming costs a few hundred
    milliseconds of page faults, so it happens only when the growth calls for it. Other C
    libraries and platforms: nothing to do."""

    def __init__(self, slack_mb: float = 64.0) -> None:
        self.slack = slack_mb * 2**20
        self.library = _glibc()
        self.baseline = _resident_bytes() if self.library is not None else 0

    def after_epoch(self) -> None:
        if self.library is None:
            return
        if _resident_bytes() - self.baseline > self.slack:
            self.library.malloc_trim(0)
            self.baseline = _resident_bytes()


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        library.malloc_trim  # present in glibc only
    except (OSError, AttributeError):
        return None
    return library


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
