"""Native CPU kernels (ktransformers.kernels) against independent references.

Weights are random valid GGUF blocks, decoded by the `gguf` package (gguf.quants.dequantize), and
the products are recomputed in float64 by torch. Inputs are fresh every run; the seed is in every
failure message.

Tolerances. A quantized kernel multiplies the weights with the activation row quantized to int8
in blocks of 32: x_i ~ d_b q_i with d_b = max|x_b| / 127 and |x_i - d_b q_i| <= d_b / 2. So
    |y - y_ref| <= sum_b (max|x_b| / 254) * sum_{i in b} |W_i|           (bound A, exact)
plus float32 rounding. Bound A is checked for every output element. Much tighter: against the
reference built from the SAME int8 activations (decoded from the kernel's own quantizer, itself
checked against numpy), only float32 accumulation error remains: 1e-5 * sum_i |W_i x^_i|, while
typical K = 512 accumulations err ~ sqrt(K / 32) * 2^-24 relative.
"""

import functools
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf import quants

from ktransformers.gguf import random_quant_bytes
from ktransformers.gguf.ggml_types import row_nbytes
import ktransformers.kernels as kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")

FLOAT_TYPES = {G.F32, G.F16, G.BF16}


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def random_weight(ggml_type, rows, cols, rng) -> np.ndarray:
    """Raw bytes of a random [rows, cols] tensor of `ggml_type` (valid blocks; float types: gaussian)."""
    if ggml_type in FLOAT_TYPES:
        w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
        dtype = {G.F32: torch.float32, G.F16: torch.float16, G.BF16: torch.bfloat16}[ggml_type]
        return w.to(dtype).view(torch.uint8).numpy().reshape(-1).copy()
    return random_quant_bytes(ggml_type, (rows, cols), rng, scale=0.02)


def dequant64(raw: np.ndarray, ggml_type, rows, cols) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw.reshape(rows, -1), ggml_type).reshape(rows, cols)).double()


def q8_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's own int8 activation rows decoded to float64, and max|x| per block of 32."""
    rows = []
    for row in x:
        q, d, _, _ = kernels.require().quantize_q8(row.numpy(), row.numel())
        q = torch.frombuffer(bytearray(q), dtype=torch.int8).double().view(-1, 32)
        rows.append((q * torch.tensor(d, dtype=torch.float64)[:, None]).view(-1))
    return torch.stack(rows), x.double().abs().view(x.shape[0], -1, 32).amax(-1)


QUANT_TYPES = [t for t in kernels.supported_types() if t not in FLOAT_TYPES]


def test_supported_types_include_the_framework_types():
    assert {G.F32, G.F16, G.BF16, G.Q8_0, G.Q4_K, G.Q5_K, G.Q6_K} <= set(kernels.supported_types())


def test_activation_quantizer_matches_numpy(isa):
    seed = new_seed()
    x = np.random.default_rng(seed).standard_normal(512).astype(np.float32) * 3
    x[32:64] = 0  # an all-zero block must give d = 0, not NaN
    q, d, s, s16 = kernels.require().quantize_q8(x, 512)
    q = np.frombuffer(q, dtype=np.int8).reshape(-1, 32).astype(np.int64)
    amax = np.abs(x.reshape(-1, 32)).max(1)
    np.testing.assert_allclose(d, amax / 127, rtol=1e-6, err_msg=f"seed {seed}")
    expect = np.round(x.reshape(-1, 32) / np.where(amax > 0, amax / 127, 1)[:, None])
    assert np.abs(q - expect).max() <= 1 and (q != expect).mean() < 0.01, f"seed {seed}"
    assert np.abs(q).max() <= 127 and np.array_equal(s, q.sum(1)), f"seed {seed}"
    assert np.array_equal(s16, q.reshape(-1, 16).sum(1)), f"seed {seed}"
    assert np.all(q[1] == 0) and d[1] == 0


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_quant_linear_matches_dequantized_matmul(isa, ggml_type, M):
    seed = new_seed()
    rng = np.random.default_rng(seed)
    N, K = 37, 512
    raw = random_weight(ggml_type, N, K, rng)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    y = kernels.quant_linear(x, torch.from_numpy(raw), ggml_type, N, K).double()
    w = dequant64(raw, ggml_type, N, K)
    where = f"{ggml_type.name} {isa} M={M} seed={seed}"

    # Bound A: the int8 activation error can move each output by at most this much.
    xq, amax = q8_decode(x)
    w_abs_blocks = w.abs().view(N, -1, 32).sum(-1)  # [N, K/32]
    bound = (amax / 254) @ w_abs_blocks.T
    scale = x.double().abs() @ w.abs().T
    err = (y - x.double() @ w.T).abs()
    assert torch.all(err <= bound * 1.001 + 1e-5 * scale), f"{where}: max excess {(err - bound).max():.3g}"

    # Same int8 activations: only float32 accumulation error is left.
    tight = (y - xq @ w.T).abs()
    budget = 1e-5 * (xq.abs() @ w.abs().T) + 1e-30
    assert torch.all(tight <= budget), f"{where}: worst error/budget {(tight / budget).max():.3g}"
    # The error actually seen is far below bound A (not just inside it).
    assert (tight.max() < 0.2 * err.max()) or err.max() < 1e-6, where


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_prefill_of_long_rows_and_uneven_token_groups(isa, ggml_type):
    """A prefill product on DeepSeek-like long rows, its tokens in groups of 4, 4 and 1: against the
    same int8 activations only float32 accumulation error remains."""
    seed = new_seed()
    rng = np.random.default_rng(seed)
    N, K, M = 19, 4608, 9
    raw = random_weight(ggml_type, N, K, rng)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    y = kernels.quant_linear(x, torch.from_numpy(raw), ggml_type, N, K).double()
    w = dequant64(raw, ggml_type, N, K)
    xq, _ = q8_decode(x)
    tight = (y - xq @ w.T).abs()
    budget = 1e-5 * (xq.abs() @ w.abs().T) + 1e-30
    assert torch.all(tight <= budget), f"{ggml_type.name} {isa} seed={seed}: worst error/budget {(tight / budget).max():.3g}"


@pytest.mark.parametrize("ggml_type", sorted(FLOAT_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 17])
def test_float_weights_use_float_activations(isa, ggml_type, M):
    seed = new_seed()
    rng = np.random.default_rng(seed)
    N, K = 21, 300  # K not a multiple of 8 or 32: float kernels have a scalar tail
    raw = random_weight(ggml_type, N, K, rng)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    y = kernels.quant_linear(x, torch.from_numpy(raw), ggml_type, N, K).double()
    w = dequant64(raw, ggml_type, N, K)
    err = (y - x.double() @ w.T).abs()
    assert torch.all(err <= 1e-5 * (x.double().abs() @ w.abs().T)), f"{ggml_type.name} {isa} seed={seed}"


def test_realistic_q8_0_weights_from_the_gguf_quantizer():
    seed = new_seed()
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((65, 1024)).astype(np.float32) * 0.02
    raw = quants.quantize(w, G.Q8_0).reshape(-1)
    x = torch.from_numpy(rng.standard_normal((5, 1024)).astype(np.float32))
    y = kernels.quant_linear(x, torch.from_numpy(raw), "Q8_0", 65, 1024)
    ref = x.double() @ dequant64(raw, G.Q8_0, 65, 1024).T
    rel = (y.double() - ref).norm() / ref.norm()
    # two 8-bit roundings of ~N(0,1) data: relative RMS error ~ 2.1 / 127 / sqrt(12) ~ 0.5%
    assert rel < 0.015, f"relative error {rel:.4f}, seed {seed}"


def moe_reference(x, ids, weights, gate, up, down):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            out[t] += float(weights[t, j]) * (down[e] @ h)
    return out


MOE_E, MOE_H, MOE_I = 8, 256, 512


@functools.lru_cache(maxsize=None)
def expert_stacks(types):
    """Random gate/up/down stacks of `types`, raw and decoded; made once per run (seed returned)."""
    seed = new_seed()
    rng = np.random.default_rng(seed)
    E, H, I = MOE_E, MOE_H, MOE_I
    raws = [random_weight(types[0], E * I, H, rng), random_weight(types[1], E * I, H, rng),
            random_weight(types[2], E * H, I, rng)]
    dense = [dequant64(raws[0], types[0], E * I, H).view(E, I, H), dequant64(raws[1], types[1], E * I, H).view(E, I, H),
             dequant64(raws[2], types[2], E * H, I).view(E, H, I)]
    return seed, [torch.from_numpy(r) for r in raws], dense


@pytest.mark.parametrize("types", [(G.Q4_K, G.Q4_K, G.Q6_K), (G.Q8_0, G.Q5_K, G.Q8_0), (G.BF16, G.BF16, G.F16)],
                         ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("T,k", [(1, 1), (1, 8), (33, 1), (33, 8)])
def test_moe_forward_matches_reference_loop(isa, types, T, k):
    weights_seed, (gate, up, down), dense = expert_stacks(types)
    seed = new_seed()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((T, MOE_H)).astype(np.float32))
    # distinct experts per token; with 33 tokens over 8 experts many tokens share each expert
    ids = torch.from_numpy(np.stack([rng.permutation(MOE_E)[:k] for _ in range(T)]))
    weights = torch.from_numpy(rng.uniform(0.1, 1.0, (T, k)).astype(np.float32))
    y = kernels.moe_forward(x, ids, weights, gate, types[0], up, types[1], down, types[2], MOE_E, MOE_H, MOE_I)
    ref = moe_reference(x.double(), ids, weights, *dense)
    rel = ((y.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()
    # int8 rounding of x then of the intermediate: ~0.5% relative each (see the Q8_0 test); float types ~1e-6
    limit = 1e-5 if types[0] in FLOAT_TYPES else 0.03
    assert rel < limit, f"{types} T={T} k={k} {isa}: relative error {rel:.4g}, seeds {weights_seed} {seed}"


@pytest.mark.parametrize("shared_types", [(G.Q4_K, G.Q4_K, G.Q6_K), (G.Q8_0, G.BF16, G.Q5_K)],
                         ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_moe_forward_adds_a_shared_expert_and_scales_the_routed_sum(isa, shared_types, T):
    """The shared expert inside the routed call (CPU decode's one native call a MoE layer) equals
    routed_scale * routed + shared computed from the gguf-decoded weights; its own width differs."""
    types = (G.Q4_K, G.Q4_K, G.Q6_K)
    weights_seed, (gate, up, down), dense = expert_stacks(types)
    seed = new_seed()
    rng = np.random.default_rng(seed)
    width = 768  # not the routed experts' 512
    raws = [random_weight(shared_types[0], width, MOE_H, rng), random_weight(shared_types[1], width, MOE_H, rng),
            random_weight(shared_types[2], MOE_H, width, rng)]
    s_gate, s_up = (dequant64(r, t, width, MOE_H) for r, t in zip(raws[:2], shared_types[:2]))
    s_down = dequant64(raws[2], shared_types[2], MOE_H, width)
    x = torch.from_numpy(rng.standard_normal((T, MOE_H)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.permutation(MOE_E)[:4] for _ in range(T)]))
    weights = torch.from_numpy(rng.uniform(0.1, 1.0, (T, 4)).astype(np.float32))
    shared = (torch.from_numpy(raws[0]), shared_types[0], torch.from_numpy(raws[1]), shared_types[1],
              torch.from_numpy(raws[2]), shared_types[2], width)
    y = kernels.moe_forward(x, ids, weights, gate, types[0], up, types[1], down, types[2], MOE_E, MOE_H, MOE_I,
                            routed_scale=2.5, shared=shared)
    xd = x.double()
    ref = 2.5 * moe_reference(xd, ids, weights, *dense)
    ref += (torch.nn.functional.silu(xd @ s_gate.T) * (xd @ s_up.T)) @ s_down.T
    rel = ((y.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()
    assert rel < 0.03, f"{shared_types} T={T} {isa}: relative error {rel:.4g}, seeds {weights_seed} {seed}"
    # and it is the sum of the two separate native calls, up to float32 summation order
    routed = kernels.moe_forward(x, ids, weights, gate, types[0], up, types[1], down, types[2], MOE_E, MOE_H, MOE_I)
    alone = kernels.moe_forward(x, torch.zeros(T, 1, dtype=torch.long), torch.zeros(T, 1), gate, types[0], up,
                                types[1], down, types[2], MOE_E, MOE_H, MOE_I, shared=shared)
    torch.testing.assert_close(y, 2.5 * routed + alone, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


def test_moe_forward_rejects_a_shared_expert_of_the_wrong_shape():
    rng = np.random.default_rng(new_seed())
    E, H, I = 4, 256, 256
    gate = torch.from_numpy(random_weight(G.Q8_0, E * I, H, rng))
    down = torch.from_numpy(random_weight(G.Q8_0, E * H, I, rng))
    small = torch.from_numpy(random_weight(G.Q8_0, 64, H, rng))  # 64 rows: not the 128 the width says
    with pytest.raises(ValueError, match="shared gate"):
        kernels.moe_forward(torch.zeros(1, H), torch.tensor([[1]]), torch.ones(1, 1), gate, "Q8_0", gate, "Q8_0",
                            down, "Q8_0", E, H, I, shared=(small, "Q8_0", small, "Q8_0", small, "Q8_0", 128))


def test_moe_forward_rejects_bad_expert_ids():
    rng = np.random.default_rng(new_seed())
    E, H, I = 4, 256, 256
    gate = torch.from_numpy(random_weight(G.Q8_0, E * I, H, rng))
    down = torch.from_numpy(random_weight(G.Q8_0, E * H, I, rng))
    with pytest.raises(ValueError, match="expert id 4 at position 0"):
        kernels.moe_forward(torch.zeros(1, H), torch.tensor([[4]]), torch.ones(1, 1), gate, "Q8_0", gate, "Q8_0",
                            down, "Q8_0", E, H, I)


def test_quant_linear_rejects_wrong_sizes_and_types():
    raw = torch.zeros(row_nbytes(G.Q4_K, 256) * 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="weight: .* bytes"):
        kernels.quant_linear(torch.zeros(1, 256), raw, "Q4_K", 4, 256)
    with pytest.raises(ValueError, match="x: expected shape"):
        kernels.quant_linear(torch.zeros(1, 255), raw, "Q4_K", 3, 256)
    with pytest.raises(ValueError, match="no native kernel"):
        kernels.quant_linear(torch.zeros(1, 256), raw, "Q8_1", 3, 256)  # an activation format: never a weight


def test_thread_count_changes_nothing_but_speed():
    seed = new_seed()
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(random_weight(G.Q4_K, 129, 512, rng))
    x = torch.from_numpy(rng.standard_normal((5, 512)).astype(np.float32))
    before = kernels.num_threads()
    try:
        kernels.set_num_threads(1)
        one = kernels.quant_linear(x, raw, "Q4_K", 129, 512)
        kernels.set_num_threads(3)
        assert kernels.num_threads() == 3
        three = kernels.quant_linear(x, raw, "Q4_K", 129, 512)
    finally:
        kernels.set_num_threads(before)
    assert torch.equal(one, three), f"seed {seed}"


def test_concurrent_calls_from_python_threads_agree():
    from concurrent.futures import ThreadPoolExecutor

    seed = new_seed()
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(random_weight(G.Q6_K, 67, 512, rng))
    xs = [torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32)) for _ in range(8)]
    alone = [kernels.quant_linear(x, raw, "Q6_K", 67, 512) for x in xs]
    with ThreadPoolExecutor(4) as ex:  # the GIL is released: these really overlap
        together = list(ex.map(lambda x: kernels.quant_linear(x, raw, "Q6_K", 67, 512), xs * 4))
    assert all(torch.equal(a, b) for a, b in zip(alone * 4, together)), f"seed {seed}"


@pytest.mark.parametrize("K", [32, 96, 352])  # fewer than / not a multiple of the 8-block Q8_0 step
def test_q8_0_rows_with_a_block_tail(isa, K):
    seed = new_seed()
    rng = np.random.default_rng(seed)
    raw = random_weight(G.Q8_0, 9, K, rng)
    x = torch.from_numpy(rng.standard_normal((2, K)).astype(np.float32))
    y = kernels.quant_linear(x, torch.from_numpy(raw), G.Q8_0, 9, K).double()
    w = dequant64(raw, G.Q8_0, 9, K)
    xq, _ = q8_decode(x)
    assert torch.all((y - xq @ w.T).abs() <= 1e-5 * (xq.abs() @ w.abs().T)), f"{isa} K={K} seed={seed}"
