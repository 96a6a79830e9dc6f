"""The plain float types F32, F16 and BF16 (ggml calls them blocks of one element)."""

import torch

from .blocks import as_dtype


def _widen(dtype: torch.dtype):
    def dequant(blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(as_dtype(blocks, dtype))  # every F16/BF16 value is exactly a float32

    dequant.__name__ = f"dequant_{str(dtype).removeprefix('torch.')}"
    return dequant


DECODERS = {
    "F32": _widen(torch.float32),
    "F16": _widen(torch.float16),
    "BF16": _widen(torch.bfloat16),
}
