"""The "cpu_quant" operator backends against the "torch" reference backends.

Same QuantTensors into both; the cpu_quant side must agree within the int8 activation
quantization error (~0.5% relative per rounding, see tests/test_cpu_kernels.py), keep the GGUF
bytes without copying them, and hand results back in the caller's dtype.
"""

import os
import tracemalloc

import numpy as np
import pytest
import torch

from ktransformers import kernels
from ktransformers.gguf import GGMLType as G
from ktransformers.gguf import QuantTensor, random_quant_bytes
from ktransformers.operators.registry import experts_backend, linear_backend

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")


def rng_and_seed():
    seed = int.from_bytes(os.urandom(4), "little")
    return np.random.default_rng(seed), seed


def quant_tensor(name, ggml_type, shape, rng):
    return QuantTensor(name, ggml_type, tuple(shape), random_quant_bytes(ggml_type, shape, rng, scale=0.05))


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_registry_names_the_cpu_quant_classes():
    from ktransformers.operators.cpu_quant import CpuQuantExperts, CpuQuantLinear

    assert linear_backend("cpu_quant") is CpuQuantLinear
    assert experts_backend("cpu_quant") is CpuQuantExperts


@pytest.mark.parametrize("ggml_type", [G.Q8_0, G.Q4_K, G.Q5_K, G.Q6_K, G.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_matches_torch_linear(ggml_type, dtype):
    rng, seed = rng_and_seed()
    weight = quant_tensor("blk.0.attn_q.weight", ggml_type, (45, 512), rng)
    bias = torch.from_numpy(rng.standard_normal(45).astype(np.float32))
    fast = linear_backend("cpu_quant")(weight, bias, "cpu", dtype)
    ref = linear_backend("torch")(weight, bias, "cpu", torch.float32)
    x = torch.from_numpy(rng.standard_normal((2, 7, 512)).astype(np.float32)).to(dtype)
    y = fast(x)
    assert y.dtype == dtype and y.device == x.device and y.shape == (2, 7, 45)
    limit = 0.02 if dtype == torch.float32 else 0.03  # bf16 output rounding adds 2^-9
    assert rel_err(y, ref(x.float())) < limit, f"{ggml_type.name} {dtype} seed {seed}"


def test_linear_keeps_the_gguf_bytes_without_copying():
    rng, _ = rng_and_seed()
    weight = quant_tensor("blk.0.ffn_down.weight", G.Q4_K, (256, 1024), rng)  # 144 KiB of blocks
    tracemalloc.start()
    layer = linear_backend("cpu_quant")(weight, None, "cpu", torch.float32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.shares_memory(layer.raw.numpy(), weight.data)
    assert peak < weight.nbytes // 10, f"construction allocated {peak} bytes for a {weight.nbytes}-byte weight"
    assert not list(layer.buffers()) and not list(layer.parameters())


def test_experts_match_torch_experts():
    rng, seed = rng_and_seed()
    E, H, I, T, k = 8, 256, 256, 9, 4
    gate = quant_tensor("blk.3.ffn_gate_exps.weight", G.Q4_K, (E, I, H), rng)
    up = quant_tensor("blk.3.ffn_up_exps.weight", G.Q4_K, (E, I, H), rng)
    down = quant_tensor("blk.3.ffn_down_exps.weight", G.Q6_K, (E, H, I), rng)
    fast = experts_backend("cpu_quant")(gate, up, down, "cpu", torch.bfloat16)
    ref = experts_backend("torch")(gate, up, down, "cpu", torch.float32)
    assert all(np.shares_memory(r.numpy(), t.data) for r, t in ((fast.gate_raw, gate), (fast.up_raw, up), (fast.down_raw, down)))
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.permutation(E)[:k] for _ in range(T)]))
    w = torch.from_numpy(rng.uniform(0.1, 1, (T, k)).astype(np.float32))
    expected = ref(x, ids, w)
    assert rel_err(fast(x, ids, w), expected) < 0.03, f"seed {seed}"
    y16 = fast(x.bfloat16(), ids, w)
    assert y16.dtype == torch.bfloat16 and rel_err(y16, expected) < 0.04, f"seed {seed}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check device round trips")
def test_results_return_to_the_input_device():
    rng, _ = rng_and_seed()
    layer = linear_backend("cpu_quant")(quant_tensor("w", G.Q8_0, (33, 256), rng), None, "cuda", torch.float16)
    y = layer(torch.randn(3, 256, device="cuda", dtype=torch.float16))
    assert y.device.type == "cuda" and y.dtype == torch.float16


def test_bad_weights_and_inputs_give_clear_errors(monkeypatch):
    rng, _ = rng_and_seed()
    Linear, Experts = linear_backend("cpu_quant"), experts_backend("cpu_quant")
    # every type a GGUF can hold has a kernel today; a future one without is played by Q4_0
    monkeypatch.setattr(kernels, "supported_types", lambda real=kernels.supported_types: [t for t in real() if t != G.Q4_0])
    with pytest.raises(ValueError, match="blk.1.attn_kv.weight: no native kernel for Q4_0"):
        Linear(quant_tensor("blk.1.attn_kv.weight", G.Q4_0, (4, 64), rng), None, "cpu", torch.float32)
    monkeypatch.undo()
    layer = Linear(quant_tensor("blk.1.attn_q.weight", G.Q8_0, (4, 64), rng), None, "cpu", torch.float32)
    with pytest.raises(ValueError, match="blk.1.attn_q.weight: input has 32 features, expected 64"):
        layer(torch.zeros(2, 32))
    g = quant_tensor("g", G.Q8_0, (2, 64, 32), rng)
    with pytest.raises(ValueError, match="do not form gate/up"):
        Experts(g, g, g, "cpu", torch.float32)


def test_missing_extension_is_reported_clearly(monkeypatch):
    rng, _ = rng_and_seed()
    monkeypatch.setattr(kernels, "_cpu", None)
    monkeypatch.setattr(kernels, "_import_error", "the native extension ktransformers.kernels._cpu is not built (test)")
    assert not kernels.available()
    with pytest.raises(RuntimeError, match="blk.0.w: cpu_quant kernels unavailable: the native extension .* is not built"):
        linear_backend("cpu_quant")(quant_tensor("blk.0.w", G.Q8_0, (4, 64), rng), None, "cpu", torch.float32)


def test_a_linear_group_gives_each_linears_own_decode_result_bit_for_bit():
    """LinearGroup (MLA's q_a + kv_a, an MLP's gate + up in one native call on a decode row) against each
    CpuQuantLinear alone: the same dot kernels on the same quantized row, so exactly equal outputs."""
    from ktransformers.operators.cpu_quant import CpuQuantLinear, LinearGroup

    rng, seed = rng_and_seed()
    linears = [CpuQuantLinear(quant_tensor(f"blk.0.w{i}.weight", t, (rows, 512), rng), None)
               for i, (t, rows) in enumerate([(G.Q4_K, 1536), (G.Q6_K, 576), (G.Q8_0, 37), (G.BF16, 70)])]
    group = LinearGroup.of(*linears)
    x = torch.from_numpy(rng.standard_normal((1, 512)).astype(np.float32))
    for got, linear in zip(group(x), linears):
        assert torch.equal(got, linear(x)), f"{linear.ggml_type.name} seed {seed}"


def test_a_linear_group_refuses_what_it_cannot_run():
    from ktransformers.operators.cpu_quant import CpuQuantLinear, LinearGroup

    rng, _ = rng_and_seed()
    a = CpuQuantLinear(quant_tensor("blk.0.a.weight", G.Q4_K, (8, 512), rng), None)
    wide = CpuQuantLinear(quant_tensor("blk.0.b.weight", G.Q4_K, (8, 768), rng), None)
    biased = CpuQuantLinear(quant_tensor("blk.0.c.weight", G.Q4_K, (8, 512), rng), torch.zeros(8))
    assert LinearGroup.of(a, wide) is None and LinearGroup.of(a, biased) is None
    assert LinearGroup.of(a, torch.nn.Linear(512, 8)) is None
    mod, out = kernels.require(), np.empty((2, 8), dtype=np.float32)
    matrix = (a._raw_np, a._type, 8, 512, a._row_bytes)
    with pytest.raises(ValueError, match="one decode row"):
        mod.linear_group(np.zeros((2, 512), dtype=np.float32), 2, [matrix], [out])
    with pytest.raises(ValueError, match="out"):
        mod.linear_group(np.zeros((1, 512), dtype=np.float32), 1, [matrix], [np.empty(4, dtype=np.float32)])
    with pytest.raises(ValueError, match="share their column count"):
        mod.linear_group(np.zeros((1, 512), dtype=np.float32), 1,
                         [matrix, (wide._raw_np, wide._type, 8, 768, wide._row_bytes)], [out[0], out[1]])
