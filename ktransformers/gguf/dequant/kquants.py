"""The 256-element k-quants Q2_K..Q6_K: a super-block fp16 scale times small per-sub-block scales."""

import torch

from .blocks import Layout, as_dtype, bit_planes, f16

Q2_K = Layout("Q2_K", scales=16, qs=64, d=2, dmin=2)
Q3_K = Layout("Q3_K", hmask=32, qs=64, scales=12, d=2)
Q4_K = Layout("Q4_K", d=2, dmin=2, scales=12, qs=128)
Q5_K = Layout("Q5_K", d=2, dmin=2, scales=12, qh=32, qs=128)
Q6_K = Layout("Q6_K", ql=128, qh=64, scales=16, d=2)


def _scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; bytes 8-11 hold the low
    4 bits of scale/min 4-7, whose top 2 bits ride in the spare top bits of bytes 0-7.
    """
    lo, mid, hi = packed.reshape(-1, 3, 4).unbind(1)
    scales = torch.cat((lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)), dim=-1)
    mins = torch.cat((mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)), dim=-1)
    return scales, mins


def _scaled(d: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-sub-block float scale d * s, shaped [n_blocks, n_sub, 1] to broadcast over the sub-block."""
    return (d * scales.float()).unsqueeze(-1)


def dequant_q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = Q2_K(blocks, "scales")
    dl = _scaled(f16(Q2_K(blocks, "d")), scales & 0x0F)
    ml = _scaled(f16(Q2_K(blocks, "dmin")), scales >> 4)
    q = bit_planes(Q2_K(blocks, "qs"), 2, rows=2).view(n, 16, 16)  # each 32-byte half: four 2-bit planes
    o = out.view(n, 16, 16)
    torch.mul(dl, q, out=o)
    o.sub_(ml)


def dequant_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    packed = Q3_K(blocks, "scales")
    # 16 6-bit signed scales: low nibbles in bytes 0-7, top 2 bits in bytes 8-11
    low = bit_planes(packed[:, :8], 4, dtype=torch.int32).view(n, 16)
    high = bit_planes(packed[:, 8:], 2, dtype=torch.int32).view(n, 16)
    dl = _scaled(f16(Q3_K(blocks, "d")), (low | (high << 4)) - 32)
    low_bits = bit_planes(Q3_K(blocks, "qs"), 2, rows=2).view(n, 16, 16)
    high_bit = bit_planes(Q3_K(blocks, "hmask"), 1).view(n, 16, 16)
    # a set hmask bit means "no offset": q = low_bits - 4 * (1 - high_bit)
    q = low_bits.add_(high_bit, alpha=4).sub_(4)
    torch.mul(dl, q, out=out.view(n, 16, 16))


def _k_dequant(blocks, layout, out, q: torch.Tensor) -> None:
    """Q4_K/Q5_K: value = d * scale * q - dmin * min over 8 sub-blocks of 32."""
    n = blocks.shape[0]
    scales, mins = _scales_and_mins(layout(blocks, "scales"))
    o = out.view(n, 8, 32)
    torch.mul(_scaled(f16(layout(blocks, "d")), scales), q, out=o)
    o.sub_(_scaled(f16(layout(blocks, "dmin")), mins))


def _four_bit(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 8 x 32 codes: each 32-byte run gives two sub-blocks (low nibbles, then high)."""
    return bit_planes(qs, 4, rows=4).view(-1, 8, 32)


def dequant_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _k_dequant(blocks, Q4_K, out, _four_bit(Q4_K(blocks, "qs")))


def dequant_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    high = bit_planes(Q5_K(blocks, "qh"), 1).view(-1, 8, 32)
    _k_dequant(blocks, Q5_K, out, _four_bit(Q5_K(blocks, "qs")).add_(high, alpha=16))


def dequant_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl = _scaled(f16(Q6_K(blocks, "d")), as_dtype(Q6_K(blocks, "scales"), torch.int8))
    low = bit_planes(Q6_K(blocks, "ql"), 4, rows=2).view(n, 8, 32)
    high = bit_planes(Q6_K(blocks, "qh"), 2, rows=2).view(n, 8, 32)
    q = low.add_(high, alpha=16).sub_(32)
    torch.mul(dl, q.view(n, 16, 16), out=out.view(n, 16, 16))


DECODERS = {
    "Q2_K": dequant_q2_k,
    "Q3_K": dequant_q3_k,
    "Q4_K": dequant_q4_k,
    "Q5_K": dequant_q5_k,
    "Q6_K": dequant_q6_k,
}
