"""kernels.head_linear (per-head linears on the native pool: MLA's absorbed W_UK / W_UV on the CPU)
and kernels.mla_decode_attention (one-token MLA attention over the latent cache).

Oracles: the weights decoded by the `gguf` package and the products recomputed in float64 by torch,
with the kernel's own int8 activations for quantized weights (tolerances as in test_cpu_kernels.py:
only float32 accumulation error is left, 1e-5 of sum |w x|); torch's float64 softmax attention.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G

import ktransformers.kernels as kernels
from ktransformers.models.absorbed_kv_b import AbsorbedKVB
from test_cpu_kernels import FLOAT_TYPES, QUANT_TYPES, dequant64, new_seed, q8_decode, random_weight

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")


def check_heads(ggml_type, H, N, K, M, seed, stride_rows=None):
    """head_linear over H heads of N rows (head h starting at row h * stride_rows) against float64 bmm."""
    rng = np.random.default_rng(seed)
    stride_rows = stride_rows or N
    raw = random_weight(ggml_type, H * stride_rows, K, rng)
    x = torch.from_numpy(rng.standard_normal((H, M, K)).astype(np.float32))
    w = dequant64(raw, ggml_type, H * stride_rows, K).view(H, stride_rows, K)[:, :N]
    stride = None if stride_rows == N else stride_rows * raw.size // (H * stride_rows)
    got = kernels.head_linear(x, torch.from_numpy(raw), ggml_type, H, N, K, head_stride=stride).double()
    assert got.shape == (H, M, N)
    if ggml_type in FLOAT_TYPES:
        xd = x.double()
    else:  # the same int8 activations the kernel multiplied
        xd = torch.stack([q8_decode(x[h])[0] for h in range(H)])
    err = (got - torch.bmm(xd, w.transpose(1, 2))).abs()
    budget = 1e-5 * torch.bmm(xd.abs(), w.abs().transpose(1, 2)) + 1e-30
    assert torch.all(err <= budget), f"{ggml_type.name} H={H} N={N} K={K} M={M} seed={seed}: {(err / budget).max():.3g}"


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 5, 40])  # decode; a prefill chunk within one token tile; two tiles
def test_quantized_heads_match_per_head_matmul(isa, ggml_type, M):
    check_heads(ggml_type, H=6, N=24, K=512, M=M, seed=new_seed())


def test_deepseek_shapes_of_w_uk_and_w_uv():
    """attn_k_b [H, kv_lora, nope] in Q8_0 and in Q5_0 (rows of 128: a Q4_K_M file's fallback) and
    attn_v_b [H, v, kv_lora] in Q4_K, at 16 heads."""
    check_heads(G.Q8_0, H=16, N=512, K=128, M=1, seed=new_seed())
    check_heads(G.Q5_0, H=16, N=512, K=128, M=1, seed=new_seed())
    check_heads(G.Q4_K, H=16, N=128, K=512, M=3, seed=new_seed())


# The 32-weight block formats rows shorter than 256 values are written in (llama.cpp's fallbacks)
SHORT_ROW_TYPES = [G.Q8_0, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.IQ4_NL]


@pytest.mark.parametrize("ggml_type", SHORT_ROW_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("K", [32, 128, 224])  # rows shorter than 256 values: the short-row form
def test_short_rows_give_decode_and_prefill_the_same_bits(isa, ggml_type, K):
    """Rows of fewer than 256 values (W_UK: 128) run 8 rows by up to 8 tokens a call, in decode and
    prefill alike: each token's result equals its one-token call bit for bit, whatever group it lands
    in, and rows past the last whole 8 (N = 21) are right too. check_heads checks the values."""
    H, N, M = 3, 21, 13
    check_heads(ggml_type, H=H, N=N, K=K, M=M, seed=new_seed())
    rng = np.random.default_rng(new_seed())
    raw = torch.from_numpy(random_weight(ggml_type, H * N, K, rng))
    x = torch.from_numpy(rng.standard_normal((H, M, K)).astype(np.float32))
    together = kernels.head_linear(x, raw, ggml_type, H, N, K)
    for t in range(M):
        assert torch.equal(kernels.head_linear(x[:, t:t + 1].contiguous(), raw, ggml_type, H, N, K), together[:, t:t + 1])


@pytest.mark.parametrize("ggml_type", SHORT_ROW_TYPES, ids=lambda t: t.name)
def test_short_rows_give_every_isa_the_same_bits(ggml_type):
    """The short-row form's integer block dots are exact in each build and its float steps are the same,
    so the AVX2 and VNNI builds agree bit for bit (the long-row forms need not)."""
    mod = kernels.require()
    before, results = mod.isa(), []
    rng = np.random.default_rng(new_seed())
    raw = torch.from_numpy(random_weight(ggml_type, 2 * 40, 128, rng))
    x = torch.from_numpy(rng.standard_normal((2, 5, 128)).astype(np.float32))
    try:
        for name in kernels.cpu_features().get("available_isas", []):
            mod.select_isa(name)
            results.append(kernels.head_linear(x, raw, ggml_type, 2, 40, 128))
    finally:
        mod.select_isa(before)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("ggml_type", sorted(FLOAT_TYPES), ids=lambda t: t.name)
def test_float_heads_use_float_activations(isa, ggml_type):
    for H, N, K, M in [(8, 64, 128, 1), (3, 5, 37, 2), (1, 1, 1, 1), (64, 3, 5, 1)]:  # vector tails, tiny heads
        check_heads(ggml_type, H, N, K, M, seed=new_seed())


def test_heads_apart_by_a_stride_read_only_their_rows():
    """An older GGUF's fused attn_kv_b holds per head nope rows of W_UK then v rows of W_UV: W_UV is read
    in place, head h's rows starting h * (nope + v) rows in."""
    check_heads(G.Q4_K, H=5, N=16, K=256, M=2, seed=new_seed(), stride_rows=40)
    check_heads(G.Q8_0, H=3, N=7, K=64, M=1, seed=new_seed(), stride_rows=9)


def test_each_head_uses_its_own_activation_rows():
    H, N, K = 16, 33, 24
    w = torch.arange(H, dtype=torch.float32)[:, None, None].expand(H, N, K).contiguous()
    x = torch.zeros(H, 1, K)
    x[torch.arange(H), 0, torch.arange(H) % K] = 1.0
    got = kernels.head_linear(x, w.view(torch.uint8).reshape(-1), G.F32, H, N, K)
    assert torch.equal(got, torch.arange(H, dtype=torch.float32)[:, None, None].expand(H, 1, N))


def test_bad_head_linear_input_is_rejected_with_the_reason():
    w = torch.zeros(2 * 4 * 8 * 4, dtype=torch.uint8)  # 2 heads of 4 x 8 float32
    with pytest.raises(ValueError, match=r"x must be \[2, M, 8\]"):
        kernels.head_linear(torch.zeros(3, 1, 8), w, G.F32, 2, 4, 8)
    with pytest.raises(ValueError, match="bytes, but 8 rows"):
        kernels.head_linear(torch.zeros(2, 1, 8), w[:-4], G.F32, 2, 4, 8)
    with pytest.raises(ValueError, match="need 384 bytes"):
        kernels.head_linear(torch.zeros(2, 1, 8), w, G.F32, 2, 4, 8, head_stride=256)
    with pytest.raises(ValueError, match="no native kernel"):
        kernels.head_linear(torch.zeros(2, 1, 8), w, G.Q8_1, 2, 4, 8)
    mod = kernels.require()
    x, out = torch.zeros(16), torch.zeros(8)
    with pytest.raises(ValueError, match="without overlapping"):  # heads closer than a head's rows
        mod.head_linear(x.numpy(), 1, w.numpy(), 0, 2, 4, 8, 32, 64, out.numpy(), 4)
    with pytest.raises(ValueError, match="weight: has 256 elements, needs 384"):  # a stride past the buffer
        mod.head_linear(x.numpy(), 1, w.numpy(), 0, 2, 4, 8, 32, 256, out.numpy(), 4)
    with pytest.raises(ValueError, match="out_ld 3 is shorter than a row"):
        mod.head_linear(x.numpy(), 1, w.numpy(), 0, 2, 4, 8, 32, 128, out.numpy(), 3)
    with pytest.raises(ValueError, match="out: has 8 elements, needs 9"):  # rows 5 apart: (2 - 1) * 5 + 4
        mod.head_linear(x.numpy(), 1, w.numpy(), 0, 2, 4, 8, 32, 128, out.numpy(), 5)


def reference_attention(q, cache, value_dim, scale):
    scores = (q.double() @ cache.double().T) * scale
    return scores.softmax(-1) @ cache.double()[:, :value_dim]


@pytest.mark.parametrize("S", [1, 7, 256, 257, 1000])  # one row; one cache block; block edges; several blocks
def test_decode_attention_matches_softmax_attention(isa, S):
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    for H, D, V in [(128, 576, 512), (5, 40, 33), (1, 3, 1)]:  # DeepSeek-V3; vector tails and a lone head
        q, cache = torch.randn(H, D, generator=gen), torch.randn(S, D, generator=gen)
        got = kernels.mla_decode_attention(q, cache, V, 0.1)
        torch.testing.assert_close(got.double(), reference_attention(q, cache, V, 0.1), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"H={H} S={S} D={D} seed={seed}: {m}")


def test_decode_attention_keeps_peaked_softmax_finite(isa):
    """Scores thousands apart (far past exp's float range) must not overflow the exponentials: the
    maximum is subtracted first. Small integers make every score exact in float32 (a float32 score of
    ~7000 is otherwise off by ~1e-3, which moves softmax weights by as much). Head h's top row is
    30 * sign(q_h) (score ~29000) and a near copy, one element a unit closer to 0, scores a few units
    less, so each softmax mixes two rows and their weights are checked against float64 closely."""
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    H, S = 8, 600
    q = torch.randint(1, 31, (H, 64), generator=gen).float() * (torch.randint(0, 2, (H, 64), generator=gen) * 2 - 1)
    cache = torch.randint(-30, 31, (S, 64), generator=gen).float()
    for h in range(H):
        top, near = 3 * h, 3 * h + 1 + S // 2
        cache[top] = 30 * q[h].sign()
        cache[near] = cache[top]
        k = int(q[h].abs().argmin())
        cache[near, k] -= q[h, k].sign()  # score lower by |q[h, k]|
    got = kernels.mla_decode_attention(q, cache, 64, 1.0)
    assert torch.isfinite(got).all()
    want = reference_attention(q, cache, 64, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("start, T", [(0, 1), (0, 9), (250, 12), (500, 20)])  # blocks: one; one; straddled; two+
def test_prefill_attention_is_causal_softmax_attention_with_decode_bits(isa, start, T):
    """Token t of a chunk at positions start.. attends cache rows 0..start+t: the float64 softmax over that
    prefix, and bit for bit what the decode kernel gives that token alone over the same rows."""
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    for H, D, V in [(16, 576, 512), (5, 40, 33)]:
        q, cache = torch.randn(H, T, D, generator=gen), torch.randn(start + T, D, generator=gen)
        got = kernels.mla_prefill_attention(q.reshape(H * T, D), cache, T, V, 0.1).view(H, T, V)
        for t in range(T):
            rows = cache[:start + t + 1]
            torch.testing.assert_close(got[:, t].double(), reference_attention(q[:, t], rows, V, 0.1), rtol=1e-5,
                                       atol=1e-5, msg=lambda m: f"H={H} start={start} t={t} seed={seed}: {m}")
            assert torch.equal(got[:, t], kernels.mla_decode_attention(q[:, t], rows, V, 0.1))


def test_bad_attention_input_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="value_dim"):
        kernels.mla_decode_attention(torch.zeros(2, 8), torch.zeros(3, 8), 9, 1.0)
    with pytest.raises(ValueError, match="float32"):
        kernels.mla_decode_attention(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(3, 8), 4, 1.0)
    with pytest.raises(ValueError, match=r"S>0"):
        kernels.mla_decode_attention(torch.zeros(2, 8), torch.zeros(0, 8), 4, 1.0)
    with pytest.raises(ValueError, match=r"S >= T"):  # 3 tokens cannot be the last rows of a 2-row cache
        kernels.mla_prefill_attention(torch.zeros(6, 8), torch.zeros(2, 8), 3, 4, 1.0)
    with pytest.raises(ValueError, match=r"H \* T"):  # 7 query rows are no whole number of heads of 2 tokens
        kernels.mla_prefill_attention(torch.zeros(7, 8), torch.zeros(4, 8), 2, 4, 1.0)


def test_float_kv_b_on_the_cpu_makes_the_reduced_dimension_contiguous():
    """The torch fallback (AbsorbedKVB) keeps weight-on-the-left layouts: W_UK stored [H, kv_lora, nope]."""
    w_uk, w_uv = torch.randn(4, 8, 16), torch.randn(4, 6, 16)
    fused = torch.cat([w_uk, w_uv], dim=1)  # the loader hands in slices of one per-head kv_b tensor
    kv_b = AbsorbedKVB(fused[:, :8], fused[:, 8:], "cpu", torch.float32)
    assert torch.equal(kv_b.w_uk, w_uk) and torch.equal(kv_b.w_uv, w_uv)
    assert kv_b.w_uk.transpose(1, 2).is_contiguous() and kv_b.w_uv.is_contiguous()
    q_nope, latent = torch.randn(3, 4, 8), torch.randn(4, 3, 16)
    torch.testing.assert_close(kv_b.absorb_query(q_nope), torch.einsum("thn,hnc->htc", q_nope, w_uk))
    torch.testing.assert_close(kv_b.expand_values(latent), torch.einsum("htc,hvc->thv", latent, w_uv))


@pytest.mark.parametrize("interleaved", [True, False], ids=["pairs", "halves"])
@pytest.mark.parametrize("T", [1, 9])  # decode (serial); a chunk (on the pool)
def test_mla_prepare_splits_normalizes_and_rotates(interleaved, T):
    """Against torch: q_nope head-major, the latent RMSNorm-ed, both rope parts turned by the complex
    rotations in either pair layout (pairs: (x0, x1), ...; halves: (x_i, x_{i + rope/2}))."""
    H, nope, rope, kv_lora = 3, 8, 6, 16
    gen = torch.Generator().manual_seed(T)
    q, kv = torch.randn(T, H * (nope + rope), generator=gen), torch.randn(T, kv_lora + rope, generator=gen)
    weight = torch.rand(kv_lora, generator=gen) + 0.5
    rotations = torch.polar(torch.rand(T, rope // 2, generator=gen) + 0.5, torch.randn(T, rope // 2, generator=gen))
    q_nope, query, rows = kernels.mla_prepare(q, kv, weight, 1e-6, rotations, interleaved, H, nope, rope)

    def turned(x):  # x [T, ..., rope]
        rot = rotations.view(T, *([1] * (x.dim() - 2)), rope // 2)
        if interleaved:
            return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rot).flatten(-2)
        z = torch.complex(*x.chunk(2, dim=-1)) * rot
        return torch.cat([z.real, z.imag], dim=-1)

    heads = q.view(T, H, nope + rope)
    torch.testing.assert_close(q_nope, heads[..., :nope].transpose(0, 1))
    torch.testing.assert_close(query[..., kv_lora:], turned(heads[..., nope:]).transpose(0, 1), rtol=1e-5, atol=1e-6)
    latent = torch.nn.functional.rms_norm(kv[:, :kv_lora], (kv_lora,), eps=1e-6) * weight
    torch.testing.assert_close(rows, torch.cat([latent, turned(kv[:, kv_lora:])], dim=-1), rtol=1e-5, atol=1e-6)
