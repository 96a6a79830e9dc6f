"""Low-bit native dot kernels (IQ1_S ... IQ4_NL) against gguf.quants.dequantize as the oracle.

Every case draws fresh random weight blocks and activations, runs them through
the public `ktransformers.kernels.quant_linear` on every ISA this CPU offers, and compares with
dequantize(bytes) @ x in float64.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

from ktransformers import kernels
from ktransformers.gguf import random_quant_bytes

if not kernels.available():
    pytest.fail(f"native kernels unavailable: {kernels.unavailable_reason()}", pytrace=False)
_cpu = kernels._cpu

LOWBIT = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.Q2_K, T.Q3_K, T.IQ4_XS, T.IQ4_NL]

# Byte offsets of the plain fp16 scale fields in one block (IQ1_M's is split, see _set_scales).
FP16_FIELDS = {T.IQ1_S: [0], T.IQ2_XXS: [0], T.IQ2_XS: [0], T.IQ2_S: [0], T.IQ3_XXS: [0], T.IQ3_S: [0],
               T.Q2_K: [80, 82], T.Q3_K: [108], T.IQ4_XS: [0], T.IQ4_NL: [0], T.IQ1_M: []}


def _set_scales(blocks: np.ndarray, ggml_type, rng) -> None:
    """Overwrite the fp16 scale fields of `blocks` [n, bytes] with random finite +-(0.5..1.5)e-2."""
    n = blocks.shape[0]
    for off in FP16_FIELDS[ggml_type]:
        d = (rng.uniform(0.5, 1.5, n) * rng.choice([-1, 1], n) * 1e-2).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    if ggml_type == T.IQ1_M:  # fp16 d = the top nibbles of the 4 uint16 scale words (bytes 48..55)
        d = (rng.uniform(0.5, 1.5, n) * 1e-2).astype(np.float16).view(np.uint16).astype(np.uint32)
        words = blocks[:, 48:56].copy().view(np.uint16).astype(np.uint32)
        for j in range(4):
            words[:, j] = (words[:, j] & 0x0FFF) | (((d >> (4 * j)) & 0xF) << 12)
        blocks[:, 48:56] = words.astype(np.uint16).view(np.uint8).reshape(n, 8)


def random_weights(ggml_type, rows: int, cols: int, rng) -> np.ndarray:
    """rows x cols weights of raw blocks: row 0 has every non-scale bit 0, row 1 every bit 1
    (extreme codes and sub-scales), rows 2-3 uniformly random bytes (all bit patterns are valid
    in these formats), both with random finite fp16 scales; the rest from random_quant_bytes."""
    block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    raw[0] = 0x00
    raw[1] = 0xFF
    crafted = raw[:4].reshape(-1, block_bytes)
    _set_scales(crafted, ggml_type, rng)
    raw[:4] = crafted.reshape(4, -1, block_bytes)
    raw[4:] = random_quant_bytes(ggml_type, (rows - 4, cols), rng, scale=0.02).reshape(rows - 4, -1, block_bytes)
    return raw.reshape(rows, -1)


def random_activations(m: int, cols: int, rng) -> np.ndarray:
    x = rng.standard_normal((m, cols)).astype(np.float32)
    x[:, :32] = 0.0  # an all-zero quantization block (scale 0)
    x[:, 32:64] *= 1000.0  # a block of large values
    return x


def quantize_like_kernel(x: np.ndarray):
    """The kernel's own Q8 rows of x: (q int8 [M, K], d float32 [M, K/32])."""
    q, d = [], []
    for row in x:
        qb, db, _, _ = _cpu.quantize_q8(row, row.size)
        q.append(np.frombuffer(qb, dtype=np.int8))
        d.append(np.asarray(db, dtype=np.float32))
    return np.stack(q), np.stack(d)


def run_kernel(x: np.ndarray, raw: np.ndarray, ggml_type, rows: int, cols: int) -> np.ndarray:
    out = kernels.quant_linear(torch.from_numpy(x), torch.from_numpy(raw.reshape(-1)), ggml_type, rows, cols)
    return out.numpy().astype(np.float64)


def _lengths(ggml_type):
    # IQ4_NL: a lone block, 8-block groups plus a tail of 1, and a DeepSeek width.
    return [32, 288, 7168] if GGML_QUANT_SIZES[ggml_type][0] == 32 else [256, 512, 7168]


CASES = [(t, k) for t in LOWBIT for k in _lengths(t)]


@pytest.mark.parametrize("m", [1, 3, 5, 8])  # 1 row; multi-row groups of 3, 5 (AVX2: 4+1) and 8 (AVX2: 4+4)
@pytest.mark.parametrize("ggml_type,cols", CASES, ids=[f"{t.name}-{k}" for t, k in CASES])
def test_lowbit_matches_gguf_dequantize(isa, ggml_type, cols, m):
    assert int(ggml_type) in _cpu.supported_types(), f"{ggml_type.name} has no kernel in {isa}"
    rng = np.random.default_rng()
    rows = 6
    raw = random_weights(ggml_type, rows, cols, rng)
    w = quants.dequantize(raw, ggml_type).astype(np.float64)  # the independent oracle
    assert w.shape == (rows, cols) and np.isfinite(w).all()
    x = random_activations(m, cols, rng)

    # (a) Activations that are exactly their own int8 quantization: the kernel must reproduce
    # dequant(W) @ x up to float32 summation order. Tolerance 1e-5 of sum |w||x| (the scale of
    # the rounding errors; the result itself may cancel to near zero).
    q, d = quantize_like_kernel(x)
    x_q = (np.repeat(d, 32, axis=1) * q).astype(np.float32)
    q_again, _ = quantize_like_kernel(x_q)
    assert np.array_equal(q_again, q), "re-quantizing x_q must give the same int8 values"
    magnitude = np.abs(x_q.astype(np.float64)) @ np.abs(w).T
    err = np.abs(run_kernel(x_q, raw, ggml_type, rows, cols) - x_q.astype(np.float64) @ w.T)
    assert (err <= 1e-5 * magnitude + 1e-30).all(), f"max err {err.max()}, max |w||x| {magnitude.max()}"

    # (b) Float activations: the only extra error is 8-bit activation rounding, at most half a
    # quantization step (amax/127)/2 per element, so |y - W x| <= |W| @ (amax_block / 254).
    step = np.repeat(np.abs(x).reshape(m, -1, 32).max(axis=2) / 254.0, 32, axis=1).astype(np.float64)
    bound = step @ np.abs(w).T * 1.001 + 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    err = np.abs(run_kernel(x, raw, ggml_type, rows, cols) - x.astype(np.float64) @ w.T)
    assert (err <= bound).all(), f"max err {err.max()} exceeds the quantization bound"


def test_iq_tables_init_is_idempotent_and_checks_input():
    from ktransformers.kernels import iq_tables

    iq_tables.init(_cpu)
    iq_tables.init(_cpu)  # second call: no-op
    tables = iq_tables.collect_tables()
    assert sorted(tables) == ["iq1s_grid", "iq2s_grid", "iq2xs_grid", "iq2xxs_grid", "iq3s_grid", "iq3xxs_grid",
                              "iq4nl_values", "ksigns"]
    with pytest.raises(ValueError, match="iq2xxs_grid.*expected 2048 bytes, got 7"):
        _cpu.init_iq_table("iq2xxs_grid", b"\x00" * 7)
    with pytest.raises(ValueError, match="'no_such_table'.*unknown"):
        _cpu.init_iq_table("no_such_table", b"")
    # Re-storing the real tables (what init does) leaves the kernels correct: the IQ2_XXS case
    # still matches the oracle afterwards.
    for name, data in tables.items():
        _cpu.init_iq_table(name, data)
    rng = np.random.default_rng()
    raw = random_weights(T.IQ2_XXS, 6, 256, rng)
    x = random_activations(1, 256, rng)
    q, d = quantize_like_kernel(x)
    x_q = (np.repeat(d, 32, axis=1) * q).astype(np.float32)
    w = quants.dequantize(raw, T.IQ2_XXS).astype(np.float64)
    err = np.abs(run_kernel(x_q, raw, T.IQ2_XXS, 6, 256) - x_q.astype(np.float64) @ w.T)
    assert (err <= 1e-5 * (np.abs(x_q) @ np.abs(w).T)).all()


# The routed-expert mixes of the Unsloth dynamic quants (gate, up, down).
MOE_MIXES = [(T.IQ1_S, T.IQ1_S, T.Q2_K), (T.IQ1_S, T.IQ1_S, T.IQ2_XXS), (T.IQ1_M, T.IQ1_M, T.Q3_K),
             (T.IQ2_XXS, T.IQ2_XXS, T.IQ3_XXS), (T.IQ2_XS, T.IQ2_XS, T.IQ4_XS), (T.IQ2_S, T.IQ2_S, T.IQ3_S)]


@pytest.mark.parametrize("mix", MOE_MIXES, ids=lambda m: "-".join(t.name for t in m))
@pytest.mark.parametrize("tokens,k", [(1, 2), (7, 3)])
def test_moe_forward_with_lowbit_experts(isa, mix, tokens, k):
    rng = np.random.default_rng()
    experts, hidden, inter = 4, 256, 512
    gate, up = (random_quant_bytes(t, (experts * inter, hidden), rng, scale=0.02) for t in mix[:2])
    down = random_quant_bytes(mix[2], (experts * hidden, inter), rng, scale=0.02)
    dense = [torch.from_numpy(quants.dequantize(raw.reshape(rows, -1), t).astype(np.float64)).view(experts, -1, cols)
             for raw, t, rows, cols in ((gate, mix[0], experts * inter, hidden), (up, mix[1], experts * inter, hidden),
                                        (down, mix[2], experts * hidden, inter))]
    x = torch.from_numpy(rng.standard_normal((tokens, hidden)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]))
    weights = torch.from_numpy(rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32))
    y = kernels.moe_forward(x, ids, weights, torch.from_numpy(gate), mix[0], torch.from_numpy(up), mix[1],
                            torch.from_numpy(down), mix[2], experts, hidden, inter).double()
    ref = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(dense[0][e] @ x[t].double()) * (dense[1][e] @ x[t].double())
            ref[t] += float(weights[t, j]) * (dense[2][e] @ h)
    # Both x and the intermediate h are rounded to int8 (about 0.5% relative each): 3% is ample,
    # while any wrong block layout or scale gives errors of order 100%.
    rel = ((y - ref).norm(dim=1) / ref.norm(dim=1)).max()
    assert rel < 0.03, f"{[t.name for t in mix]} relative error {rel:.4g}"


@pytest.mark.parametrize("ggml_type", LOWBIT, ids=lambda t: t.name)
def test_a_row_in_a_multi_row_group_has_its_single_row_bits(isa, ggml_type):
    """Each activation row keeps its own accumulation chain in the multi-row kernels, so a prefill
    group of 8 (or 4 + 4) gives every row exactly what its one-row (decode) call gives."""
    rng = np.random.default_rng()
    cols = _lengths(ggml_type)[1]
    raw = random_weights(ggml_type, 5, cols, rng)
    x = random_activations(8, cols, rng)
    together = run_kernel(x, raw, ggml_type, 5, cols)
    for i in range(8):
        assert np.array_equal(run_kernel(x[i:i + 1], raw, ggml_type, 5, cols), together[i:i + 1]), i
