"""Shared helpers for the block decoders: byte layouts, fp16 fields, bit unpacking, table lookups.

Every decoder sees `blocks`, a contiguous uint8 tensor [n_blocks, bytes_per_block], and writes
float32 values into `out` [n_blocks, elements_per_block].

Speed note: torch's CPU kernels are only fast on long runs of contiguous elements. A block field
is a strided slice with short rows (16..128 bytes), so `bit_planes` copies a field to contiguous
memory once, does the bit arithmetic there, and converts to float32 while scattering the codes
into ggml's element order.
"""

from __future__ import annotations

from functools import cache

import torch

from ..ggml_types import block_info


class Layout:
    """Named byte fields of one block, in file order: `Layout("Q4_0", d=2, qs=16)`."""

    def __init__(self, type_name: str, **sizes: int):
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in sizes.items():
            self.offsets[name] = (start, start + size)
            start += size
        expected = block_info(type_name)[1]
        if start != expected:  # a typo here would silently misread every tensor of this type
            raise AssertionError(f"{type_name} layout has {start} bytes, ggml says {expected}")

    def __call__(self, blocks: torch.Tensor, name: str) -> torch.Tensor:
        """The bytes of field `name` of every block: [n_blocks, field_size] uint8 (a view)."""
        start, stop = self.offsets[name]
        return blocks[:, start:stop]


def as_dtype(field: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret little-endian bytes [n, k] as [n, k / itemsize] of `dtype`.

    A strided slice can only be viewed when its offsets line up with the wider type; copying the
    (small) field to fresh storage first makes any layout work.
    """
    try:
        return field.view(dtype)
    except RuntimeError:
        return field.clone(memory_format=torch.contiguous_format).view(dtype)


def f16(field: torch.Tensor) -> torch.Tensor:
    """An fp16 scale field [n, 2] as float32 [n, 1] (exact: every fp16 is a float32)."""
    return as_dtype(field, torch.float16).float()


def u16(field: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 words as int32 (torch has no full uint16 arithmetic)."""
    return as_dtype(field, torch.int16).int() & 0xFFFF


def bit_planes(field: torch.Tensor, bits: int, rows: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Split the bytes of `field` [n, k] into `bits`-wide codes: [n, rows, 8 // bits, k // rows].

    The field is read as `rows` runs of bytes; plane p of a run holds bits p*bits.. of each of
    its bytes. With rows=1 that is ggml's usual "all low nibbles, then all high nibbles" order;
    with rows=k the codes of one byte end up adjacent, least significant first.
    """
    n, k = field.shape
    packed = field.contiguous()
    mask = (1 << bits) - 1
    codes = torch.empty(n, rows, 8 // bits, k // rows, dtype=dtype, device=field.device)
    for plane, shift in enumerate(range(0, 8, bits)):
        values = packed >> shift if shift else packed
        values = values & mask if shift + bits < 8 else values
        codes[:, :, plane].copy_(values.view(n, rows, -1))  # converts while scattering into place
    return codes


_PLACED: dict[tuple[int, torch.device], torch.Tensor] = {}


def placed(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A cached constant tensor on `device` (copied there once), so decoding also runs on GPUs."""
    if table.device == device:
        return table
    key = (id(table), device)  # the constants live as long as the process, so ids stay unique
    if key not in _PLACED:
        _PLACED[key] = table.to(device)
    return _PLACED[key]


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a small table ([rows] or [rows, width]) and any integer index tensor.

    Returns [*index] or [*index, width]. (index_select is the fast gather here; a 1-D table beats
    a [rows, 1] one several times over.)
    """
    table = placed(table, index.device)
    rows = index.int().reshape(-1)
    if table.dim() == 2 and table.device.type != "cpu":
        # GPUs gather single elements ~10x faster than short rows: index the flattened table
        width = table.shape[1]
        columns = torch.arange(width, dtype=torch.int32, device=table.device)
        found = torch.index_select(table.reshape(-1), 0, (rows.unsqueeze(1) * width + columns).reshape(-1))
    else:
        found = torch.index_select(table, 0, rows)
    return found.view(*index.shape, *table.shape[1:])


@cache
def _bit_table(zero: float, one: float) -> torch.Tensor:
    """[256, 8] float32: entry j of row b is `one` where bit j of b is set, else `zero`."""
    bits = (torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1
    return torch.where(bits == 1, one, zero).float()


def expand_bits(field: torch.Tensor, zero: float, one: float) -> torch.Tensor:
    """One bit per element, least significant first: bytes [n, k] -> float32 [n, 8 k] of zero/one."""
    return lookup(_bit_table(float(zero), float(one)), field).view(field.shape[0], -1)
