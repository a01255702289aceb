"""Open a data file only when it is a regular file.

A named pipe blocks its reader until something writes into it, a character device such as
/dev/zero never ends, a socket cannot be read as a file: any of them in place of a label, feature
or cache file would hang a run or fill its memory. So the kind of file is checked before it is
opened (opening may already block or act on a device), and again on the opened descriptor (the
path may have changed in between), before a byte is read.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from dataloader.datasets import DataError

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"))


class NotRegularFile(DataError):
    """A path that should hold a data file holds a pipe, a socket, a device or a folder."""


def _refuse_unless_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    raise NotRegularFile(f"{path}: is {kind}, not a regular file, and reading it could block or "
                         f"never end; put the file itself there.")


def check_regular(path: Path) -> None:
    """Raise NotRegularFile when `path` (through links) exists but is no regular file; an
    OSError (absent, unreadable) is left to the caller, who names what is missing."""
    _refuse_unless_regular(path, os.stat(path).st_mode)


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[BinaryIO]:
    """`path` opened for binary reading, or NotRegularFile (or the OSError of opening it)."""
    check_regular(path)
    # Non-blocking, so that a pipe put there since the check cannot block the open itself.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_unless_regular(path, os.fstat(descriptor).st_mode)
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with handle:
        yield handle
