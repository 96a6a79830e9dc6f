"""Backend resolution: cpu_quant falls back to torch for linears it cannot run, never for experts."""

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


def test_linear_of_a_type_without_kernel_falls_back_to_torch(caplog):
    weight = quant_tensor("blk.0.attn_q_a.weight", GGMLType.Q4_0, (8, 64))  # no native Q4_0 kernel
    with caplog.at_level(logging.WARNING):
        layer = build_linear("cpu_quant", weight, None, "cpu", torch.float32)
    assert isinstance(layer, TorchLinear)
    assert "blk.0.attn_q_a.weight" in caplog.text and "Q4_0" in caplog.text
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ weight.dequantize().T)


def test_linear_falls_back_when_the_extension_is_unusable(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "CPU lacks AVX2")
    weight = quant_tensor("output.weight", GGMLType.Q8_0, (8, 64))
    with caplog.at_level(logging.WARNING):
        layer = build_linear("cpu_quant", weight, None, "cpu", torch.float32)
    assert isinstance(layer, TorchLinear) and "CPU lacks AVX2" in caplog.text


def test_experts_without_kernel_are_an_error_naming_the_tensor():
    gate = quant_tensor("blk.1.ffn_gate_exps.weight", GGMLType.Q4_0, (2, 64, 64))
    up = quant_tensor("blk.1.ffn_up_exps.weight", GGMLType.Q4_0, (2, 64, 64), seed=1)
    down = quant_tensor("blk.1.ffn_down_exps.weight", GGMLType.Q4_0, (2, 64, 64), seed=2)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate_exps.*Q4_0.*backend: torch"):
        build_experts("cpu_quant", gate, up, down, "cpu", torch.float32)


def test_unknown_backend_is_named():
    weight = quant_tensor("w", GGMLType.Q8_0, (4, 32))
    with pytest.raises(ValueError, match="unknown linear backend 'fast'"):
        build_linear("fast", weight, None, "cpu", torch.float32)
