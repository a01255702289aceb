"""Where a run executes: device choice, optional CUDA autocast, and peak memory.

The CPU path is the reference; CUDA runs the same code. `--amp` (off by default) wraps the forward
pass in bfloat16 autocast on CUDA only; losses and metrics stay in float32.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu'; 'cuda' or 'cuda:N' (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: use auto, cpu or cuda:N.")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak CUDA memory allocated on a GPU, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return {"device": str(device), "memory": "peak_cuda_allocated",
                "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"device": "cpu", "memory": "peak_rss", "peak_memory_mb": peak * scale / 2**20}


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


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        library.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return library


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Each batch allocates tensors of slightly different sizes, and glibc keeps the freed blocks,
    so a long run's resident memory creeps up epoch after epoch although the live memory does not;
    trimming once per epoch keeps the peak at what one epoch needs."""
    library = _glibc()
    if library is not None:
        library.malloc_trim(0)
