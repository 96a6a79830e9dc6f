"""Valid random ggml blocks with a chosen spread, for synthetic models and tests.

Codes and sub-block scales are uniform random bytes; only the fp16 scale fields are chosen, so
every bit pattern the decoders can meet in the code fields gets exercised.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import numpy as np
import torch

from .dequant import LAYOUTS, decoder_for, dequantize
from .ggml_types import GGMLType, block_info, resolve_type

FLOAT_TYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}
MIN_FIELDS = ("m", "dmin")  # fp16 fields that shift values; "d" fields multiply them
SCALE_FIELDS = ("d",) + MIN_FIELDS


def scale_fields(ggml_type) -> tuple[str, ...]:
    """Names of the fp16 fields of a block type (IQ1_M's is split over its "scales" words)."""
    qtype = resolve_type(ggml_type)
    if qtype == GGMLType.IQ1_M:
        return ("d",)
    return tuple(name for name in LAYOUTS[qtype].offsets if name in SCALE_FIELDS)


def write_scale(blocks: np.ndarray, ggml_type, name: str, values) -> None:
    """Store `values` (one per block, rounded to fp16) in field `name` of `blocks` [n_blocks, bytes]."""
    qtype = resolve_type(ggml_type)
    half = np.asarray(values, dtype=np.float32).astype(np.float16).reshape(-1)
    if qtype == GGMLType.IQ1_M:
        # the fp16 bits sit in the top nibble of the odd bytes 1, 3, 5, 7 of the scale words
        start = LAYOUTS[qtype].offsets["scales"][0]
        bits = half.view(np.uint16)
        for i in range(4):
            column = blocks[:, start + 2 * i + 1]
            column &= 0x0F
            column |= ((bits >> (4 * i)) & 0x0F).astype(np.uint8) << 4
        return
    start, stop = LAYOUTS[qtype].offsets[name]
    blocks[:, start:stop] = half.view(np.uint8).reshape(-1, 2)


def random_quant_bytes(ggml_type, shape: Sequence[int], rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Random blocks of `ggml_type` for a torch-order `shape` whose values have std close to `scale`."""
    qtype, _ = decoder_for(ggml_type)
    shape = tuple(int(size) for size in shape)
    elements, block_bytes = block_info(qtype)
    if not shape or shape[-1] % elements:
        raise ValueError(f"{qtype.name}: shape {shape} needs a last dimension that is a multiple of {elements}")
    if qtype in FLOAT_TYPES or qtype == GGMLType.BF16:
        values = rng.standard_normal(prod(shape), dtype=np.float32) * np.float32(scale)
        if qtype == GGMLType.BF16:
            return torch.from_numpy(values).to(torch.bfloat16).view(torch.uint8).numpy()
        return values.astype(FLOAT_TYPES[qtype]).view(np.uint8)

    n_blocks = prod(shape) // elements
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if n_blocks == 0:
        return blocks.reshape(-1)
    fields = scale_fields(qtype)
    d = rng.uniform(0.5, 1.5, n_blocks).astype(np.float32)  # varied per block, like real tensors

    def decode(d_values, min_values) -> torch.Tensor:
        write_scale(blocks, qtype, "d", d_values)
        for name in fields[1:]:
            write_scale(blocks, qtype, name, min_values)
        return dequantize(blocks, qtype, (n_blocks, elements))

    # values are linear in (d, min): pick min = ratio * d so that the tensor is centred on zero
    ratio = 0.0
    if len(fields) > 1:
        scaled, shift = (decode(*pair).sum(dtype=torch.float64).item() for pair in ((d, 0.0), (0.0, d)))
        ratio = -scaled / shift if shift != 0 else 0.0
    spread = float(decode(d, ratio * d).std())
    factor = scale / spread if spread > 0 else 0.0
    if max(1.0, abs(ratio)) * 1.5 * factor > float(np.finfo(np.float16).max):
        raise ValueError(f"{qtype.name}: scale {scale} needs fp16 block scales beyond the fp16 range")
    decode(d * factor, ratio * d * factor)
    return blocks.reshape(-1)


__all__ = ["random_quant_bytes", "scale_fields", "write_scale"]
