"""A kv_b_proj rule may store the float copy of W_UK that an older GGUF's fused attn_kv_b needs (the
file stores it transposed; W_UV is read from the blocks in place) in bfloat16 under float32 CPU
attention and cache (an opt-in: half the bytes of that copy, at bfloat16-rounding accuracy).

Oracles: the same cpu_quant model with the shipped rules (float32 kv_b), and the torch float32
reference path (the one tests/test_model_vs_hf.py checks against transformers)."""

import pytest
import torch

from ktransformers import kernels
from ktransformers.gguf import GGMLType
from ktransformers.models.loader import load_model
from ktransformers.optimize import optimize
from test_mla_cpu_native import check_greedy_decoding, rel_err

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")
CPU_RULES = optimize.RULES_DIR / "DeepSeek-V3-Chat-cpu.yaml"
BF16_KV_B_RULE = r"""
- match:
    name: '^model\.layers\.\d+\.self_attn\.kv_b_proj$'
  replace: {backend: cpu_quant, device: cpu, dtype: bfloat16}
"""


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """The tiny Q4_K_M model under (the CPU rules with a bfloat16 kv_b rule first, the shipped CPU
    rules, the torch float32 reference rules)."""
    rules_dir = tmp_path_factory.mktemp("rules")
    bf16_kv_b = rules_dir / "cpu-bf16-kv_b.yaml"
    bf16_kv_b.write_text(BF16_KV_B_RULE + CPU_RULES.read_text())
    torch_rules = rules_dir / "torch.yaml"
    torch_rules.write_text("- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n")
    path = tiny_model(quant_mix="q4_k_m")
    return [load_model(path, path, rules, device="cpu", max_context=32).model
            for rules in (bf16_kv_b, CPU_RULES, torch_rules)]


def test_bfloat16_kv_b_rule_keeps_float32_attention_and_w_uv_in_place(models):
    shipped, reference, _ = models
    for layer in shipped.model.layers:
        attn = layer.self_attn
        assert attn.kv_b_proj.w_uk.ggml_type == GGMLType.BF16
        assert attn.kv_b_proj.w_uv.ggml_type not in (GGMLType.BF16, GGMLType.F32)  # the GGUF's blocks
        assert attn.dtype == attn.kv_cache.dtype == torch.float32
    assert reference.model.layers[0].self_attn.kv_b_proj.w_uk.ggml_type == GGMLType.F32


def test_bfloat16_kv_b_attention_matches_float32_within_rounding(models):
    """Prefill 11 tokens and decode one, layer by layer on equal inputs (whole-model logits could
    differ by a flipped near-tied expert choice, which says nothing about the attention)."""
    xs = torch.randn(12, models[0].config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for index in range(len(models[0].model.layers)):
            shipped, reference = (m.model.layers[index].self_attn for m in models[:2])
            for start, end in ((0, 11), (11, 12)):  # a prefill chunk, then one decode step
                got, expected = shipped(xs[start:end], start), reference(xs[start:end], start)
                assert got.dtype == torch.float32
                # bfloat16 keeps 8 significant bits (relative rounding <= 2^-9 per weight and query value)
                assert 0 < rel_err(got, expected) < 1e-2, (index, start)
            assert rel_err(shipped.kv_cache[:12], reference.kv_cache[:12]) < 1e-6  # the cache is not rounded


def test_bfloat16_kv_b_stays_as_close_to_the_reference_as_the_native_kernels_allow(models):
    """The native kernels quantize activations to 8 bits: the cpu_quant model sits ~1.3 % (median over
    tokens) from the torch reference with a float32 kv_b; bfloat16 W_UK/W_UV must not add more than
    that, and greedy decoding must pick the reference's tokens."""
    shipped, _, reference = models
    errors = check_greedy_decoding(shipped, reference)
    assert errors[len(errors) // 2] < 3e-2
