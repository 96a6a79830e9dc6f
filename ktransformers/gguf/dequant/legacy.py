"""The 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (value = d * q [+ m])."""

import torch

from .blocks import Layout, as_dtype, bit_planes, expand_bits, f16

Q4_0 = Layout("Q4_0", d=2, qs=16)
Q4_1 = Layout("Q4_1", d=2, m=2, qs=16)
Q5_0 = Layout("Q5_0", d=2, qh=4, qs=16)
Q5_1 = Layout("Q5_1", d=2, m=2, qh=4, qs=16)
Q8_0 = Layout("Q8_0", d=2, qs=32)


def _four_bit(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes -> 32 codes 0..15: element i is the low nibble of byte i, element 16+i the high one."""
    return bit_planes(qs, 4).view(qs.shape[0], 32)


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Codes 0..31: the fifth bit of element j is bit j of the little-endian 32-bit `qh`."""
    return _four_bit(qs).add_(expand_bits(qh, 0, 16))


def dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(f16(Q4_0(blocks, "d")), _four_bit(Q4_0(blocks, "qs")).sub_(8), out=out)


def dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(f16(Q4_1(blocks, "d")), _four_bit(Q4_1(blocks, "qs")), out=out)
    out.add_(f16(Q4_1(blocks, "m")))


def dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _five_bit(Q5_0(blocks, "qh"), Q5_0(blocks, "qs")).sub_(16)
    torch.mul(f16(Q5_0(blocks, "d")), q, out=out)


def dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(f16(Q5_1(blocks, "d")), _five_bit(Q5_1(blocks, "qh"), Q5_1(blocks, "qs")), out=out)
    out.add_(f16(Q5_1(blocks, "m")))


def dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(f16(Q8_0(blocks, "d")), as_dtype(Q8_0(blocks, "qs"), torch.int8).float(), out=out)


DECODERS = {
    "Q4_0": dequant_q4_0,
    "Q4_1": dequant_q4_1,
    "Q5_0": dequant_q5_0,
    "Q5_1": dequant_q5_1,
    "Q8_0": dequant_q8_0,
}
