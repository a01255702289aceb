"""One exception type for bad input, so the command line can print it as one sentence.

From: SPEC §8. Every message names the file or flag at fault and says what to do.
"""
from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used: a missing file, a wrong shape, a non-finite value."""
