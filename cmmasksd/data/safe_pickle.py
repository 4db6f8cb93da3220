"""Load the refer toolkit's annotation pickles without letting them run code.

`pickle.load` executes whatever callable a file names (`os.system`, ...). The `refs(*).p`
files only need plain containers and scalars, which the pickle protocol builds with its own
opcodes; every named global (the only way a pickle reaches code) is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


class UnsafePickleError(ValueError):
    """The pickle names a global (a class or function): loading it could execute code."""


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        # Python 2 `str` fields arrive as bytes; latin1 maps them 1:1 (as the refer toolkit does).
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._path}: refused global {module}.{name}; only plain containers and scalars "
            "(dict, list, tuple, str, bytes, int, float, bool, None) are allowed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r}")


def load_pickle(path: str | Path) -> Any:
    """Unpickle `path` allowing only plain data; raise `UnsafePickleError` on anything else."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            return _PlainUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise ValueError(f"{path}: not a readable pickle: {err}") from err
