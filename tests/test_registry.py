"""Backend resolution: cpu_quant falls back to torch for linears it cannot run; experts fall back only
when the native kernels cannot run at all (then without float copies); a bad KT_CPU_ISA is an error."""

import logging

import numpy as np
import pytest
import torch

from ktransformers import kernels
from ktransformers.gguf import GGMLType, QuantTensor, random_quant_bytes
from ktransformers.operators.linear import TorchLinear
from ktransformers.operators.registry import build_experts, build_linear


def quant_tensor(name, ggml_type, shape, seed=0):
    data = random_quant_bytes(ggml_type, shape, np.random.default_rng(seed), scale=0.02)
    return QuantTensor(name, GGMLType(ggml_type), tuple(shape), data)


@pytest.fixture
def no_q4_0_kernel(monkeypatch):
    """Every type a GGUF can hold has a native kernel today; a future one without is played by Q4_0."""
    real = kernels.supported_types
    monkeypatch.setattr(kernels, "supported_types", lambda: [t for t in real() if t != GGMLType.Q4_0])


def test_linear_of_a_type_without_kernel_falls_back_to_torch(caplog, no_q4_0_kernel):
    weight = quant_tensor("blk.0.attn_q_a.weight", GGMLType.Q4_0, (8, 64))
    with caplog.at_level(logging.WARNING):
        layer = build_linear("cpu_quant", weight, None, "cpu", torch.float32)
    assert isinstance(layer, TorchLinear)
    assert "blk.0.attn_q_a.weight" in caplog.text and "Q4_0" in caplog.text
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ weight.dequantize().T)


def test_a_cpu_without_avx2_gets_one_log_line_and_torch_backends(monkeypatch, caplog):
    from ktransformers.operators import registry
    from ktransformers.operators.experts import DequantOnUseExperts, TorchExperts

    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "this CPU lacks AVX2/FMA, which the native cpu_quant kernels need")
    monkeypatch.setattr(registry, "_fallback_logged", False)
    weight = quant_tensor("output.weight", GGMLType.Q8_0, (8, 64))
    stacks = [quant_tensor(f"blk.1.ffn_{part}_exps.weight", GGMLType.Q4_K, shape, seed=i)
              for i, (part, shape) in enumerate([("gate", (4, 256, 256)), ("up", (4, 256, 256)), ("down", (4, 256, 256))])]
    with caplog.at_level(logging.WARNING):
        layers = [build_linear("cpu_quant", weight, None, "cpu", torch.float32) for _ in range(2)]
        experts = [build_experts("cpu_quant", *stacks, "cpu", torch.float32) for _ in range(2)]
    assert all(isinstance(layer, TorchLinear) for layer in layers)
    assert all(isinstance(e, DequantOnUseExperts) for e in experts)
    lines = [r.getMessage() for r in caplog.records if r.name == registry.__name__]
    assert len(lines) == 1, lines
    assert "need AVX2+FMA" in lines[0] and "using the torch backend" in lines[0] and "times slower" in lines[0]
    # the on-use experts compute what the dequantized reference computes, and hold no float copies
    assert not list(experts[0].buffers())
    x = torch.randn(5, 256)
    ids = torch.tensor([[0, 3], [1, 3], [2, 0], [3, 1], [0, 2]])
    w = torch.rand(5, 2)
    torch.testing.assert_close(experts[0](x, ids, w), TorchExperts(*stacks, "cpu", torch.float32)(x, ids, w))


class _FakeExtension:
    def __init__(self, runnable):
        self.runnable = runnable

    def available_isas(self):
        return self.runnable

    def isa(self):
        return self.runnable[0] if self.runnable else ""


@pytest.mark.parametrize("forced, runnable, error", [
    ("avx2", ["avx512vnni", "avx2"], None),
    ("vnni", ["avx512vnni+gather", "avx512vnni", "avx2"], None),
    ("avx512vnni", ["avx2"], r"KT_CPU_ISA=avx512vnni: this CPU cannot run that kernel table \(it runs avx2\)"),
    ("vnni", ["avx2"], "KT_CPU_ISA=vnni: this CPU cannot run"),
    ("avx2", [], "KT_CPU_ISA=avx2: .*lacks AVX2/FMA"),
    ("avx1024", ["avx2"], "KT_CPU_ISA=avx1024: unknown kernel table; known: avx512vnni"),
])
def test_a_forced_kernel_table_this_cpu_cannot_run_is_a_clear_error(monkeypatch, forced, runnable, error):
    monkeypatch.setenv("KT_CPU_ISA", forced)
    monkeypatch.setattr(kernels, "_cpu", _FakeExtension(runnable))
    weight = quant_tensor("output.weight", GGMLType.Q8_0, (8, 64))
    if error is None:
        assert kernels.isa_override_error() is None
        return
    with pytest.raises(ValueError, match=error):
        build_linear("cpu_quant", weight, None, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match=error):
        kernels.require()


def test_experts_without_kernel_are_an_error_naming_the_tensor(no_q4_0_kernel):
    gate = quant_tensor("blk.1.ffn_gate_exps.weight", GGMLType.Q4_0, (2, 64, 64))
    up = quant_tensor("blk.1.ffn_up_exps.weight", GGMLType.Q4_0, (2, 64, 64), seed=1)
    down = quant_tensor("blk.1.ffn_down_exps.weight", GGMLType.Q4_0, (2, 64, 64), seed=2)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate_exps.*Q4_0.*backend: torch"):
        build_experts("cpu_quant", gate, up, down, "cpu", torch.float32)


def test_unknown_backend_is_named():
    weight = quant_tensor("w", GGMLType.Q8_0, (4, 32))
    with pytest.raises(ValueError, match="unknown linear backend 'fast'"):
        build_linear("fast", weight, None, "cpu", torch.float32)
