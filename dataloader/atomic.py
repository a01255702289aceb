"""Whole-file writes, appends and a full disk in one sentence: the one home of every write.

A whole file (a result, a checkpoint, the stage-1 cache, the feature cache, a report table) is
written to a temporary sibling `<name>.<pid>.tmp` and renamed over its target, so a crash never
leaves a half-written file that looks whole; on any failure the temporary file is removed (on a
full disk it would hold on to the very space that is missing). An append (the epoch log, the run
log) that fails is cut back to the length it had, so no half line is left. A full device or quota
(ENOSPC, EDQUOT) becomes `NoSpace`, a refused write (read-only, permissions) `CannotWrite`; each
message names the folder and what to do.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


class CannotWrite(OSError):
    """A folder cannot be written (read-only, permissions); the message is one sentence."""


class NoSpace(CannotWrite):
    """The device (or quota) of a folder is full; the message is one sentence naming it."""


def no_space(folder: Path) -> NoSpace:
    error = NoSpace(f"no space left on the device of {folder}; free some space there (or write "
                    f"elsewhere) and run the same command again.")
    error.errno = errno.ENOSPC
    return error


@contextlib.contextmanager
def write_errors_named(folder: Path) -> Iterator[None]:
    """Inside the block, a full device becomes `NoSpace` and a refused write `CannotWrite`,
    each naming `folder`."""
    try:
        yield
    except CannotWrite:
        raise
    except OSError as error:
        if error.errno in _FULL:
            raise no_space(folder) from None
        if error.errno in _DENIED:
            denied = CannotWrite(f"{folder} cannot be written ({os.strerror(error.errno)}); "
                                 f"make it writable or write elsewhere, then run the same "
                                 f"command again.")
            denied.errno = error.errno
            raise denied from None
        raise


def temporary_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (git-ignored: `*.tmp`)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces `path` when the block ends without error; on an
    error nothing of it is left."""
    temporary = temporary_sibling(path)
    try:
        with write_errors_named(path.parent):
            with _opened(temporary, "wb") as handle:
                yield handle
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a whole file through a temporary sibling and a rename: never half-written."""
    with atomic_file(path) as handle:
        handle.write(content.encode() if isinstance(content, str) else content)


def save_torch_atomic(path: Path, payload: Any) -> None:
    """`torch.save` through memory and `write_atomic`: torch's own file writer reports a full
    disk as a bare RuntimeError and leaves its partial file behind."""
    import torch
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getbuffer())


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` (created when absent); on a failure the file is cut back to its
    earlier length, so a reader never meets half a line."""
    data = memoryview(text.encode())
    with write_errors_named(path.parent):
        with _opened(path, "ab") as handle:
            start = handle.seek(0, os.SEEK_END)
            try:
                while data:  # unbuffered: a write may take part of the bytes
                    data = data[handle.write(data):]
            except BaseException:
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                raise


def _opened(path: Path, mode: str) -> BinaryIO:
    """The one place files are opened for writing (tests put a full disk here). Appends are
    unbuffered, so that a failed one has nothing left in a buffer to write on close."""
    return open(path, mode, buffering=0 if "a" in mode else -1)
