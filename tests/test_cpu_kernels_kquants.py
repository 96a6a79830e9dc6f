"""Q4_K / Q5_K / Q6_K native dot kernels on extreme and arbitrary blocks, against gguf.quants.dequantize.

test_cpu_kernels.py checks every kernel on random_quant_bytes blocks; here the blocks are the
corners the kernels' integer tricks must survive: every non-scale bit 0, every bit 1 (largest
quants and sub-scales), uniformly random bytes (any bit pattern is a valid block once the fp16
scales are finite), and activations with an all-zero block and a block of int8 +-127. Each case
runs the decode (1 row) and the multi-row prefill paths (3 = 3 rows, 5 = 4 + 1, 6 = 4 + 2) on
every kernel table of this CPU. (Q2_K and Q3_K get the same cases in test_cpu_kernels_lowbit.py.)
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from ktransformers import kernels

if not kernels.available():
    pytest.fail(f"native kernels unavailable: {kernels.unavailable_reason()}", pytrace=False)
_cpu = kernels._cpu

# Byte offsets of the fp16 scale fields in one block.
FP16_FIELDS = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def crafted_weights(ggml_type, cols: int, rng) -> np.ndarray:
    """4 rows of raw blocks: all bits 0, all bits 1, then 2 rows of random bytes; random finite scales."""
    block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (4, cols // block_elems, block_bytes), dtype=np.uint8)
    raw[0] = 0x00
    raw[1] = 0xFF
    blocks = raw.reshape(-1, block_bytes)
    for off in FP16_FIELDS[ggml_type]:
        d = (rng.uniform(0.5, 1.5, len(blocks)) * rng.choice([-1, 1], len(blocks)) * 1e-2).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(4, -1)


def activations(m: int, cols: int, rng) -> np.ndarray:
    x = rng.standard_normal((m, cols)).astype(np.float32)
    x[:, :32] = 0.0  # quantization scale 0
    x[:, 32:64] = rng.choice([-1.0, 1.0], (m, 32)) * 1000.0  # int8 +-127 everywhere: the largest products
    return x


def own_int8(x: np.ndarray) -> np.ndarray:
    """x replaced by the kernel's own int8 quantization of it (so the kernel sees it exactly)."""
    rows = []
    for row in x:
        q, d, _, _ = _cpu.quantize_q8(row, row.size)
        rows.append(np.repeat(np.asarray(d, np.float32), 32) * np.frombuffer(q, np.int8))
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("m", [1, 3, 5, 6])
@pytest.mark.parametrize("cols", [256, 512, 7168])
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_kquant_corner_blocks_match_gguf_dequantize(isa, ggml_type, cols, m):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    raw = crafted_weights(ggml_type, cols, rng)
    w = quants.dequantize(raw, ggml_type).astype(np.float64)  # the independent oracle
    assert np.isfinite(w).all()
    x = own_int8(activations(m, cols, rng))
    y = kernels.quant_linear(torch.from_numpy(x), torch.from_numpy(raw.reshape(-1)), ggml_type, 4, cols).numpy()
    # Only float32 summation error remains: 1e-5 of sum |w||x| (the result itself may cancel to ~0).
    err = np.abs(y.astype(np.float64) - x.astype(np.float64) @ w.T)
    budget = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    where = f"{ggml_type.name} {isa} cols={cols} m={m} seed={seed}"
    assert (err <= budget).all(), f"{where}: worst error/budget {(err / budget).max():.3g} (rows: 0 bits, 1 bits, random, random)"
