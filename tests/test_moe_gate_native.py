"""The router scored by the native kernels (CPU rules: cpu_quant reads the GGUF's F32 router rows in
place) routes exactly as the torch float32 reference scorer does, and the native choice of experts
from the logits (kernels.moe_route, used on the CPU) equals MoEGate.route_torch's torch ops."""

import numpy as np
import pytest
import torch

from ktransformers import kernels
from ktransformers.gguf import GGMLType, QuantTensor
from ktransformers.models.config import config_from_hf_dict
from ktransformers.models.loader import load_model
from ktransformers.operators.cpu_quant import CpuQuantLinear
from ktransformers.operators.linear import TorchLinear
from ktransformers.operators.moe_gate import MoEGate
from ktransformers.optimize.optimize import default_rules_path

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")


def v3_routing_config(**overrides):
    fields = dict(
        model_type="deepseek_v3", vocab_size=64, hidden_size=1024, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=64, n_shared_experts=1,
        num_experts_per_tok=6, n_group=8, topk_group=3, norm_topk_prob=True, routed_scaling_factor=2.5,
        topk_method="noaux_tc", scoring_func="sigmoid")
    return config_from_hf_dict({**fields, **overrides}, "test config")


@pytest.mark.parametrize("overrides", [{}, {"topk_method": "greedy", "scoring_func": "softmax"}], ids=["v3", "v2"])
def test_native_f32_scorer_routes_like_the_torch_reference(overrides):
    cfg = v3_routing_config(**overrides)
    rng = np.random.default_rng(0)
    router = rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size), dtype=np.float32) * np.float32(0.05)
    weight = QuantTensor("blk.1.ffn_gate_inp.weight", GGMLType.F32, router.shape, router.reshape(-1).view(np.uint8))
    bias = torch.from_numpy(rng.standard_normal(cfg.n_routed_experts, dtype=np.float32) * np.float32(0.01))
    native = MoEGate(CpuQuantLinear(weight, None, "cpu", torch.float32), bias, cfg, "cpu")
    reference = MoEGate(TorchLinear(weight, None, "cpu", torch.float32), bias, cfg, "cpu")
    assert np.shares_memory(native.scorer.raw.numpy(), router)  # read in place, no float copy

    x = torch.from_numpy(rng.standard_normal((48, cfg.hidden_size), dtype=np.float32))
    logits = native.scorer(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ torch.from_numpy(router).T, rtol=1e-5, atol=1e-5)  # float32 dots
    for rows in (x[:1], x):  # a decode step, a prefill chunk
        ids, weights = native(rows)
        ref_ids, ref_weights = reference.route_torch(reference.scorer(rows))
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_cpu_rules_score_the_router_natively_and_torch_rules_in_float32(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tiny_model(quant_mix="q4_k_m")
    model = load_model(path, path, default_rules_path(False), device="cpu", max_context=16).model
    gate = model.model.layers[1].mlp.gate
    assert isinstance(gate.scorer, CpuQuantLinear) and gate.scorer.ggml_type == GGMLType.F32
    torch_rules = tmp_path / "torch-bf16.yaml"
    torch_rules.write_text("- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: bfloat16}\n")
    ref_gate = load_model(path, path, torch_rules, device="cpu", max_context=16).model.model.layers[1].mlp.gate
    assert isinstance(ref_gate.scorer, TorchLinear) and ref_gate.scorer.weight.dtype == torch.float32

    # inputs a bfloat16 rule's activations can hold exactly, so both gates see the same values
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ids, weights = gate(x.float())
    ref_ids, ref_weights = ref_gate(x)
    assert ref_weights.dtype == weights.dtype == torch.float32  # scores stay float32 under a bfloat16 rule
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


ROUTINGS = {
    "v3 noaux_tc": {},
    "v2 group_limited_greedy": dict(model_type="deepseek_v2", topk_method="group_limited_greedy", scoring_func="softmax",
                                    n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3),
    "v2 greedy": dict(model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", norm_topk_prob=False),
    "two experts a group": dict(n_routed_experts=16, n_group=8, topk_group=4, num_experts_per_tok=3),
}


@pytest.mark.parametrize("overrides", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("T", [1, 3, 200])  # decode (serial), a few tokens, a prefill chunk (on the pool)
def test_native_choice_equals_the_torch_ops(overrides, T):
    cfg = v3_routing_config(**{**dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4), **overrides})
    gen = torch.Generator().manual_seed(T)
    bias = torch.randn(cfg.n_routed_experts, generator=gen) * 0.1 if cfg.topk_method == "noaux_tc" else None
    gate = MoEGate(torch.nn.Identity(), bias, cfg, "cpu")
    logits = torch.randn(T, cfg.n_routed_experts, generator=gen) * 3
    ids, weights = gate(logits)  # the Identity scorer hands the logits through: native routing
    ref_ids, ref_weights = gate.route_torch(logits)
    assert torch.equal(ids, ref_ids)  # the same experts, best first
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)


def test_native_choice_rejects_impossible_routing():
    logits = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="needs the routing bias"):
        kernels.moe_route(logits, None, "noaux_tc", True, 4, 2, 2, True)
    with pytest.raises(ValueError, match="cannot form 5 groups"):
        kernels.moe_route(logits, torch.zeros(16), "noaux_tc", True, 5, 2, 2, True)
    with pytest.raises(ValueError, match="hold 9 picks"):
        kernels.moe_route(logits, torch.zeros(16), "noaux_tc", True, 4, 2, 9, True)
    with pytest.raises(ValueError, match="unknown method"):
        kernels.moe_route(logits, None, "best", True, 1, 1, 2, True)
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        kernels.moe_route(logits, torch.zeros(8), "noaux_tc", True, 4, 2, 2, True)
