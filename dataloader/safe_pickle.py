"""Load GCNet label pickles without letting them run code.

From: SPEC §2. A pickle names the functions it calls while loading; this unpickler admits only
builtin containers and the few numpy names that rebuild arrays and scalars, and refuses anything
else before it is imported, so nothing in a hostile file runs.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from dataloader.errors import DataError

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
        with path.open("rb") as handle:
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
