"""Safetensors files, read one tensor at a time into numpy and written from numpy (bfloat16 included)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy, where safetensors' numpy reader looks BF16 up)
import numpy as np
import safetensors
import safetensors.numpy

from moelora_jax.errors import UserError


class SafetensorsFile:
    """One ``.safetensors`` file, read by the ``safetensors`` library one tensor at a time into numpy (bfloat16
    included); a corrupt or truncated file raises :class:`UserError`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            # pread, not the default mmap: mapped pages would count against the process until the file is closed.
            self._file = safetensors.safe_open(self.path, framework="np", backend="pread")
        except safetensors.SafetensorError as e:
            raise UserError(f"{self.path} is corrupt or truncated ({e}); re-download or re-export it.") from None
        self._names = dict.fromkeys(self._file.keys())

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def get(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise UserError(f"{self.path} has no tensor {name!r}; re-download or re-export it.")
        return self._file.get_tensor(name)


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (numpy, bfloat16 included) as one ``.safetensors`` file."""
    # The library writes each array's buffer as is: a strided view (a transpose) must be made contiguous first.
    safetensors.numpy.save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, path, metadata)
