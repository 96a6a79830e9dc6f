"""kernels.head_gemv (per-head matrix-vector products on the native pool) and its use in CPU MLA decode.

Oracle: torch.einsum in float64 on the same (float32/float16/bfloat16-valued) weights. The kernel
accumulates in float32, so each output may err by ~K * 2^-24 of sum_k |w x|; 1e-5 of that sum is
far above the rounding and far below any wrong element or missed row.
"""

import os

import pytest
import torch

import ktransformers.kernels as kernels
from ktransformers.models.loader import load_model
from ktransformers.optimize import optimize

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (H, N, K): DeepSeek-V3's W_UK and W_UV at 8 heads; tails of every vector width (K % 8, K < 8);
# many short rows, so one work item spans several heads; a single head and a single row.
SHAPES = [(8, 512, 128), (8, 128, 512), (3, 5, 37), (64, 3, 5), (2, 9, 7), (1, 1, 1), (1, 300, 40)]


def check_against_einsum(w: torch.Tensor, x: torch.Tensor, seed: int):
    got = kernels.head_gemv(w, x)
    assert got.dtype == torch.float32 and got.shape == (w.shape[0], w.shape[1])
    terms = w.double() * x.double()[:, None, :]
    expected, magnitude = terms.sum(-1), terms.abs().sum(-1)
    err = (got.double() - expected).abs()
    assert torch.all(err <= 1e-5 * magnitude + 1e-30), f"seed {seed}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_einsum_on_every_kernel_table(isa, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    for H, N, K in SHAPES:
        w = torch.randn(H, N, K, generator=gen).to(dtype)
        x = torch.randn(H, K, generator=gen) * 3
        check_against_einsum(w, x, seed)


def test_each_head_uses_its_own_vector():
    """Head h's rows against x[h] only: a constant head and one-hot vectors expose any mix-up."""
    H, N, K = 16, 33, 24
    w = torch.arange(H, dtype=torch.float32)[:, None, None].expand(H, N, K).contiguous()
    x = torch.zeros(H, K)
    x[torch.arange(H), torch.arange(H) % K] = 1.0
    assert torch.equal(kernels.head_gemv(w, x), torch.arange(H, dtype=torch.float32)[:, None].expand(H, N))


def test_weight_views_that_are_contiguous_are_accepted():
    """The CPU W_UK is stored [H, kv_lora, nope] and passed as its transpose's transpose: a contiguous view."""
    storage = torch.randn(4, 64, 16)
    w_uk = storage.transpose(1, 2)  # what AbsorbedKVB holds
    x = torch.randn(4, 16)
    check_against_einsum(w_uk.transpose(1, 2), x, seed=0)


def test_empty_shapes_give_empty_or_zero_results():
    assert kernels.head_gemv(torch.zeros(0, 4, 8), torch.zeros(0, 8)).shape == (0, 4)
    assert torch.equal(kernels.head_gemv(torch.zeros(3, 4, 0), torch.zeros(3, 0)), torch.zeros(3, 4))


@pytest.mark.parametrize("w, x, message", [
    (torch.zeros(4, 8), torch.zeros(4, 8), r"w must be a CPU \[H, N, K\]"),
    (torch.zeros(2, 4, 8, dtype=torch.float64), torch.zeros(2, 8), "torch.float64"),
    (torch.zeros(2, 4, 8, dtype=torch.int32), torch.zeros(2, 8), "torch.int32"),
    (torch.zeros(2, 8, 4).transpose(1, 2), torch.zeros(2, 8), "must be contiguous"),
    (torch.zeros(2, 4, 8), torch.zeros(2, 4), r"x must be a CPU float32 tensor of shape \(2, 8\)"),
    (torch.zeros(2, 4, 8), torch.zeros(3, 8), r"shape \(2, 8\).*\(3, 8\)"),
    (torch.zeros(2, 4, 8), torch.zeros(2, 8, dtype=torch.bfloat16), "torch.bfloat16"),
    (torch.zeros(2, 4, 8), [[0.0] * 8] * 2, "got list"),
    ("weights", torch.zeros(2, 8), "got str"),
], ids=["2d", "float64", "int32", "strided", "x-short", "x-heads", "x-bf16", "x-list", "w-str"])
def test_bad_input_is_rejected_with_the_reason(w, x, message):
    with pytest.raises(ValueError, match=message):
        kernels.head_gemv(w, x)


def test_native_binding_checks_type_and_sizes():
    """The extension re-checks what the Python wrapper promises, so a direct call cannot read out of bounds."""
    mod = kernels.require()
    w, x, out = torch.zeros(2 * 4 * 8, dtype=torch.uint8), torch.zeros(2 * 8), torch.zeros(2 * 4)
    with pytest.raises(ValueError, match="F32, F16 or BF16 weights, got ggml type 12"):
        mod.head_gemv(w.numpy(), 12, 2, 4, 2, x.numpy(), out.numpy())  # Q4_K
    with pytest.raises(ValueError, match="w: has 64 elements, needs 256"):
        mod.head_gemv(w.numpy(), 0, 2, 4, 8, x.numpy(), out.numpy())  # 64 bytes are not 2x4x8 float32
    with pytest.raises(ValueError, match="x: has 16 elements, needs 32"):
        mod.head_gemv(torch.zeros(4 * 4 * 8, dtype=torch.float32).view(torch.uint8).numpy(), 0, 4, 4, 8,
                      x.numpy(), torch.zeros(16).numpy())
    with pytest.raises(ValueError, match="empty shape"):
        mod.head_gemv(w.numpy(), 0, 2, 0, 8, x.numpy(), out.numpy())


@pytest.fixture(scope="module")
def cpu_attention(tiny_model):
    """Layer 0's attention of the tiny F32 model under the shipped CPU rules, and the hidden size."""
    path = tiny_model()
    model = load_model(path, path, optimize.RULES_DIR / "DeepSeek-V3-Chat-cpu.yaml", device="cpu", max_context=16).model
    return model.model.layers[0].self_attn, model.config.hidden_size


def test_cpu_decode_runs_head_gemv_and_matches_bmm(cpu_attention, monkeypatch):
    """A one-token step uses head_gemv for both absorbed products (prefill keeps torch.bmm); the result
    equals the torch.bmm path that runs when the kernels are unavailable."""
    attn, hidden = cpu_attention
    calls = []
    real = kernels.head_gemv
    monkeypatch.setattr(kernels, "head_gemv", lambda w, x: calls.append(tuple(w.shape)) or real(w, x))
    xs = torch.randn(6, hidden, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        attn(xs[:5], 0)
        assert calls == []  # prefill: torch.bmm
        native = attn(xs[5:], 5)
        H, C = attn.n_heads, attn.kv_lora_rank
        assert calls == [(H, C, attn.nope_dim), (H, attn.v_dim, C)]
        monkeypatch.setattr(kernels, "available", lambda: False)
        fallback = attn(xs[5:], 5)  # rewrites the same cache row, then the torch.bmm products
    assert len(calls) == 2
    torch.testing.assert_close(native, fallback, rtol=1e-5, atol=1e-6)
