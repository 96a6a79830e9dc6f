"""The i-quants: codebook (grid) indices with sign masks (IQ1..IQ3) and the non-linear IQ4 levels.

Grids, the sign table and the IQ4 levels come from the installed `gguf` package at first use and
are cached as small torch tables.
"""

from functools import cache

import gguf.quants
import numpy as np
import torch

from .blocks import Layout, as_dtype, bit_planes, expand_bits, f16, lookup, placed, u16

IQ2_XXS = Layout("IQ2_XXS", d=2, qs=64)
IQ2_XS = Layout("IQ2_XS", d=2, qs=64, scales=8)
IQ2_S = Layout("IQ2_S", d=2, qs=32, signs=32, qh=8, scales=8)
IQ3_XXS = Layout("IQ3_XXS", d=2, qs=64, scales=32)
IQ3_S = Layout("IQ3_S", d=2, qs=64, qh=8, signs=32, scales=4)
IQ1_S = Layout("IQ1_S", d=2, qs=32, qh=16)
IQ1_M = Layout("IQ1_M", qs=32, qh=16, scales=8)
IQ4_NL = Layout("IQ4_NL", d=2, qs=16)
IQ4_XS = Layout("IQ4_XS", d=2, scales_h=2, scales_l=4, qs=128)

IQ1_DELTA = float(gguf.quants.IQ1_S.delta)


@cache
def grid(type_name: str) -> torch.Tensor:
    """The codebook of an i-quant as float32 [entries, values per entry]."""
    quant = getattr(gguf.quants, type_name)
    quant.init_grid()
    return torch.from_numpy(np.ascontiguousarray(quant.grid, dtype=np.float32).reshape(quant.grid_shape))


@cache
def sign_table() -> torch.Tensor:
    """ksigns as float32 [128, 8] of +-1: 7 stored sign bits, the 8th makes the count of minuses even."""
    ksigns = torch.frombuffer(bytearray(gguf.quants.IQ2_XXS.ksigns), dtype=torch.uint8)
    return expand_bits(ksigns.view(-1, 1), 1, -1)


@cache
def iq4_levels() -> torch.Tensor:
    """The 16 non-linear IQ4 levels as a float32 table."""
    return torch.tensor(gguf.quants.IQ4_NL.kvalues, dtype=torch.float32)


def _iq4_levels(qs: torch.Tensor, rows: int) -> torch.Tensor:
    """IQ4 bytes [n, k] -> levels [n, rows, 2, k / rows]: per run, the low nibbles' levels then the high ones'."""
    return lookup(iq4_levels(), bit_planes(qs, 4, rows=rows, dtype=torch.int32))


def _nibble_scales(d: torch.Tensor, packed: torch.Tensor, step: float) -> torch.Tensor:
    """IQ2_XS/IQ2_S: 4-bit scales s, low nibble first -> d * (0.5 + s) * step."""
    return d * (bit_planes(packed, 4, rows=packed.shape[1]).view(packed.shape[0], -1) + 0.5) * step


_SIGN_SHIFTS = torch.tensor([0, 7, 14, 21], dtype=torch.int32)


def _packed_signs_and_scale(aux: torch.Tensor, d: torch.Tensor, step: float):
    """IQ2_XXS/IQ3_XXS: a 32-bit word = four 7-bit ksigns indices + a 4-bit scale on top."""
    signs = lookup(sign_table(), (aux.unsqueeze(-1) >> placed(_SIGN_SHIFTS, aux.device)) & 0x7F)
    scale = d * (((aux >> 28) & 0x0F).float() + 0.5) * step
    return signs, scale


def dequant_iq2_xxs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    # 8 groups of 32 values: 4 grid bytes, then a 32-bit word with their signs and scale
    words = IQ2_XXS(blocks, "qs").view(n, 8, 8)
    aux = as_dtype(words[..., 4:], torch.int32).view(n, 8)
    signs, scale = _packed_signs_and_scale(aux, f16(IQ2_XXS(blocks, "d")), 0.25)
    values = lookup(grid("IQ2_XXS"), words[..., :4])
    torch.mul(scale.view(n, 8, 1, 1) * values, signs, out=out.view(n, 8, 4, 8))


def dequant_iq2_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    codes = u16(IQ2_XS(blocks, "qs"))  # 9-bit grid index, 7-bit ksigns index
    scale = _nibble_scales(f16(IQ2_XS(blocks, "d")), IQ2_XS(blocks, "scales"), 0.25)
    values = lookup(grid("IQ2_XS"), codes & 511).view(n, 16, 2, 8)
    signs = lookup(sign_table(), codes >> 9).view(n, 16, 2, 8)
    torch.mul(scale.view(n, 16, 1, 1) * values, signs, out=out.view(n, 16, 2, 8))


def dequant_iq2_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    high = bit_planes(IQ2_S(blocks, "qh"), 2, rows=8, dtype=torch.int32).view(n, 32)
    index = IQ2_S(blocks, "qs").int() | (high << 8)
    scale = _nibble_scales(f16(IQ2_S(blocks, "d")), IQ2_S(blocks, "scales"), 0.25)
    values = lookup(grid("IQ2_S"), index).view(n, 16, 2, 8)
    signs = expand_bits(IQ2_S(blocks, "signs"), 1, -1).view(n, 16, 2, 8)
    torch.mul(scale.view(n, 16, 1, 1) * values, signs, out=out.view(n, 16, 2, 8))


def dequant_iq3_xxs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    aux = as_dtype(IQ3_XXS(blocks, "scales"), torch.int32)
    signs, scale = _packed_signs_and_scale(aux, f16(IQ3_XXS(blocks, "d")), 0.5)
    values = lookup(grid("IQ3_XXS"), IQ3_XXS(blocks, "qs")).view(n, 8, 4, 8)
    torch.mul(scale.view(n, 8, 1, 1) * values, signs, out=out.view(n, 8, 4, 8))


def dequant_iq3_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    high = bit_planes(IQ3_S(blocks, "qh"), 1, rows=8, dtype=torch.int32).view(n, 64)
    index = IQ3_S(blocks, "qs").int() | (high << 8)
    odd = bit_planes(IQ3_S(blocks, "scales"), 4, rows=4).view(n, 8) * 2 + 1
    scale = f16(IQ3_S(blocks, "d")) * odd
    values = lookup(grid("IQ3_S"), index).view(n, 8, 4, 8)
    signs = expand_bits(IQ3_S(blocks, "signs"), 1, -1).view(n, 8, 4, 8)
    torch.mul(scale.view(n, 8, 1, 1) * values, signs, out=out.view(n, 8, 4, 8))


_IQ1_SHIFTS = torch.tensor([0, 3, 6, 9], dtype=torch.int32)


def dequant_iq1_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    # one 16-bit word per 32 values: 4 x 3 high index bits, a 3-bit scale, the delta's sign
    qh = u16(IQ1_S(blocks, "qh"))
    index = IQ1_S(blocks, "qs").view(n, 8, 4).int() | (((qh.unsqueeze(-1) >> placed(_IQ1_SHIFTS, qh.device)) & 7) << 8)
    scale = f16(IQ1_S(blocks, "d")) * (((qh >> 12) & 7) * 2 + 1).float()
    delta = torch.where(qh & 0x8000 == 0, IQ1_DELTA, -IQ1_DELTA)
    values = lookup(grid("IQ1_S"), index) + delta.view(n, 8, 1, 1)
    torch.mul(scale.view(n, 8, 1, 1), values, out=out.view(n, 8, 4, 8))


def _iq1_m_super_scale(packed: torch.Tensor) -> torch.Tensor:
    """IQ1_M's fp16 scale is split over the top nibbles of its four 16-bit scale words."""
    low = (packed[:, 1] >> 4) | (packed[:, 3] & 0xF0)
    high = (packed[:, 5] >> 4) | (packed[:, 7] & 0xF0)
    return f16(torch.stack((low, high), dim=-1))


def dequant_iq1_m(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    packed = IQ1_M(blocks, "scales")
    sub_scales = ((u16(packed).unsqueeze(-1) >> placed(_IQ1_SHIFTS, packed.device)) & 7).view(n, 16)
    scale = _iq1_m_super_scale(packed) * (sub_scales * 2 + 1).float()
    # per group of 8: a nibble with 3 high index bits and the delta's sign
    high = bit_planes(IQ1_M(blocks, "qh"), 4, rows=16, dtype=torch.int32).view(n, 32)
    index = IQ1_M(blocks, "qs").int() | ((high & 7) << 8)
    delta = torch.where(high & 8 == 0, IQ1_DELTA, -IQ1_DELTA)
    values = lookup(grid("IQ1_M"), index) + delta.view(n, 32, 1)
    torch.mul(scale.view(n, 16, 1, 1), values.view(n, 16, 2, 8), out=out.view(n, 16, 2, 8))


def dequant_iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    levels = _iq4_levels(IQ4_NL(blocks, "qs"), rows=1).view(-1, 32)
    torch.mul(f16(IQ4_NL(blocks, "d")), levels, out=out)


_IQ4_XS_SHIFTS = torch.arange(0, 16, 2, dtype=torch.int32)


def dequant_iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    low = bit_planes(IQ4_XS(blocks, "scales_l"), 4, rows=4, dtype=torch.int32).view(n, 8)
    high = (u16(IQ4_XS(blocks, "scales_h")) >> placed(_IQ4_XS_SHIFTS, blocks.device)) & 3
    scale = f16(IQ4_XS(blocks, "d")) * ((low | (high << 4)) - 32).float()
    levels = _iq4_levels(IQ4_XS(blocks, "qs"), rows=8).view(n, 8, 32)
    torch.mul(scale.view(n, 8, 1), levels, out=out.view(n, 8, 32))


DECODERS = {
    "IQ1_S": dequant_iq1_s,
    "IQ1_M": dequant_iq1_m,
    "IQ2_XXS": dequant_iq2_xxs,
    "IQ2_XS": dequant_iq2_xs,
    "IQ2_S": dequant_iq2_s,
    "IQ3_XXS": dequant_iq3_xxs,
    "IQ3_S": dequant_iq3_s,
    "IQ4_NL": dequant_iq4_nl,
    "IQ4_XS": dequant_iq4_xs,
}
