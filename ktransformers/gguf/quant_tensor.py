"""QuantTensor: one GGUF tensor as raw blocks living in the file's memory map."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import torch

from .ggml_types import GGMLType, row_nbytes


@dataclass(frozen=True)
class QuantTensor:
    """A tensor's raw ggml blocks; `shape` is in torch order (outermost first, the reverse of ggml `ne`).

    `data` is a 1-D uint8 view into the memory map: nothing is copied until `dequantize`.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray = field(repr=False)

    def __post_init__(self):
        expected = row_nbytes(self.ggml_type, self.shape[-1]) * prod(self.shape[:-1])
        if self.data.dtype != np.uint8 or self.data.ndim != 1 or self.data.size != expected:
            raise ValueError(
                f"tensor {self.name!r}: {self.ggml_type.name} {self.shape} needs {expected} bytes as a 1-D uint8 "
                f"array, got {self.data.dtype} {self.data.shape}"
            )

    @property
    def nbytes(self) -> int:
        return self.data.size

    def raw(self) -> torch.Tensor:
        """The blocks as a uint8 torch tensor sharing memory with the map."""
        return torch.from_numpy(self.data)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode the blocks into a dense tensor of `shape`."""
        from .dequant import dequantize_rows  # imported late: reading a file needs no torch decoders

        # decode straight into `dtype`: no float32 copy of a whole bf16 tensor
        n_cols = self.shape[-1]
        return dequantize_rows(self.raw(), self.ggml_type, prod(self.shape) // n_cols, n_cols, dtype=dtype).view(self.shape)

    def select(self, index: int) -> QuantTensor:
        """The `index`-th slice along dim 0 (e.g. one expert of an `ffn_*_exps` stack), without copying."""
        if len(self.shape) < 2:
            raise IndexError(f"tensor {self.name!r} of shape {self.shape} has no dimension to select along")
        count = self.shape[0]
        if not -count <= index < count:
            raise IndexError(f"tensor {self.name!r}: index {index} out of range for dim 0 of size {count}")
        index %= count
        stride = self.nbytes // count
        return QuantTensor(
            f"{self.name}[{index}]", self.ggml_type, self.shape[1:], self.data[index * stride:(index + 1) * stride]
        )
