"""Decode ggml quantized blocks into float tensors, vectorized in torch.

`dequantize(raw, ggml_type, shape)` is the entry point; `dequantize_rows` fills a caller's buffer
chunk by chunk, so the scratch memory stays a few MB whatever the tensor size.
"""

from __future__ import annotations

import warnings
from math import prod
from typing import Callable, Sequence

import numpy as np
import torch

from ..ggml_types import GGMLType, block_info, resolve_type
from . import floats, iquants, kquants, legacy

Decoder = Callable[[torch.Tensor, torch.Tensor], None]

DECODERS: dict[GGMLType, Decoder] = {
    GGMLType[name]: decoder
    for module in (floats, legacy, kquants, iquants)
    for name, decoder in module.DECODERS.items()
}
SUPPORTED_TYPES = tuple(DECODERS)
# byte layouts of the block types (each kernel module names its Layout after the type)
LAYOUTS = {
    GGMLType[name]: getattr(module, name) for module in (legacy, kquants, iquants) for name in module.DECODERS
}

# Elements decoded per step on the CPU: large enough to amortize torch's per-op overhead, small
# enough that the temporaries of a step (a few times 2 MB) stay in cache. GPUs take big steps.
CHUNK_ELEMENTS = 1 << 19
GPU_CHUNK_ELEMENTS = 1 << 24

RawBytes = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


def as_byte_tensor(raw: RawBytes) -> torch.Tensor:
    """Any of the accepted raw kinds as a flat uint8 tensor, sharing memory where possible."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw tensor must be uint8 bytes, got {raw.dtype}")
        return raw.reshape(-1)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    if not isinstance(raw, np.ndarray):
        raise TypeError(f"raw must be a uint8 torch tensor, numpy array, bytes, bytearray or memoryview, got {type(raw).__name__}")
    if raw.dtype != np.uint8:
        raise TypeError(f"raw numpy array must be uint8 bytes, got {raw.dtype}")
    with warnings.catch_warnings():
        # read-only inputs (bytes, memory maps) are fine: the decoders never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))


def decoder_for(ggml_type) -> tuple[GGMLType, Decoder]:
    qtype = resolve_type(ggml_type)
    if qtype not in DECODERS:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"dequantization of ggml type {qtype.name} is not supported (supported: {names})")
    return qtype, DECODERS[qtype]


def dequantize_rows(
    raw: RawBytes,
    ggml_type,
    n_rows: int,
    n_cols: int,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode `n_rows` rows of `n_cols` elements into `out` (or a new [n_rows, n_cols] tensor of `dtype`).

    Decoding runs where `raw` lives: pass a CUDA uint8 tensor (and a CUDA `out`) to decode on the GPU.
    """
    qtype, decode = decoder_for(ggml_type)
    elements, block_bytes = block_info(qtype)
    if n_rows < 0 or n_cols < 0:
        raise ValueError(f"{qtype.name}: negative tensor size {n_rows}x{n_cols}")
    if n_cols % elements:
        raise ValueError(f"{qtype.name}: row length {n_cols} is not a multiple of the block size {elements}")
    data = as_byte_tensor(raw)
    n_blocks = n_rows * (n_cols // elements)
    if data.numel() != n_blocks * block_bytes:
        raise ValueError(
            f"{qtype.name} tensor of {n_rows}x{n_cols} needs {n_blocks * block_bytes} bytes "
            f"({n_blocks} blocks of {block_bytes}), got {data.numel()}"
        )
    if out is None:
        out = torch.empty(n_rows, n_cols, dtype=dtype, device=data.device)
    elif out.numel() != n_rows * n_cols or not out.is_contiguous() or not out.is_floating_point() or out.device != data.device:
        raise ValueError(
            f"out must be a contiguous float tensor of {n_rows}x{n_cols} elements on {data.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )

    blocks = data.view(n_blocks, block_bytes)
    dest = out.view(n_blocks, elements)
    step = max(1, (CHUNK_ELEMENTS if data.device.type == "cpu" else GPU_CHUNK_ELEMENTS) // elements)
    # decoders produce float32; other output dtypes go through one reused scratch buffer
    scratch = None if out.dtype == torch.float32 else torch.empty(min(step, n_blocks), elements, device=data.device)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        target = dest[start:stop] if scratch is None else scratch[: stop - start]
        decode(blocks[start:stop], target)
        if scratch is not None:
            dest[start:stop].copy_(target)
    return out


def dequantize(raw: RawBytes, ggml_type, shape: Sequence[int]) -> torch.Tensor:
    """Decode a whole tensor of torch-order `shape` (last dim = row length) into float32."""
    shape = tuple(int(size) for size in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension (the row length)")
    return dequantize_rows(raw, ggml_type, prod(shape[:-1]), shape[-1]).view(shape)


__all__ = ["dequantize", "dequantize_rows", "DECODERS", "LAYOUTS", "SUPPORTED_TYPES", "CHUNK_ELEMENTS"]
