"""Long GPU prefill chunks expand MLA's cache rows into per-head keys and values and run torch's fused
attention (mla.py's expanded form). It must give the absorbed form's output, also for a chunk that
follows earlier cache rows (its queries see all of those and only their own chunk's past), and it
must step aside where the expanded context would not fit its byte budget.

Oracle: the absorbed form of the same layer on the same inputs (the path tests/test_model_vs_hf.py
checks against transformers). Runs on the CPU in float32 (the torch rules) by lowering the
threshold, and on cuda in bfloat16 where there is one, at the shipped threshold."""

import pytest
import torch

from ktransformers.models import mla
from ktransformers.models.absorbed_kv_b import AbsorbedKVB
from ktransformers.models.loader import load_model
from ktransformers.optimize.optimize import default_rules_path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
MAX_CONTEXT = 1200


@pytest.fixture(scope="module")
def cpu_attention(tiny_model, tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "torch.yaml"
    rules.write_text("- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n")
    path = tiny_model(quant_mix="q4_k_m")
    attn = load_model(path, path, rules, device="cpu", max_context=64).model.model.layers[0].self_attn
    assert isinstance(attn.kv_b_proj, AbsorbedKVB) and attn.expanded_min_tokens is None  # CPU default: absorbed
    return attn


def run_chunks(attn, xs, chunks, expanded_min_tokens):
    """The layer's outputs for xs fed as consecutive chunks (sizes `chunks`), from an empty cache."""
    attn.expanded_min_tokens = expanded_min_tokens
    attn.kv_cache.zero_()
    outputs, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            outputs.append(attn(xs[start:start + n], start))
            start += n
    return torch.cat(outputs), attn.kv_cache[:start].clone()


def relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("chunks", [(20,), (7, 13), (12, 1, 7)])
def test_expanded_form_equals_absorbed_on_cpu(cpu_attention, chunks, monkeypatch):
    attn = cpu_attention
    xs = torch.randn(sum(chunks), attn.kv_a_proj_with_mqa.in_features, generator=torch.Generator().manual_seed(0))
    calls = []
    expanded = attn._expanded_attention
    monkeypatch.setattr(attn, "_expanded_attention", lambda *a: calls.append(a[0].shape[0]) or expanded(*a))
    want, want_cache = run_chunks(attn, xs, chunks, None)
    assert calls == []
    got, got_cache = run_chunks(attn, xs, chunks, 2)
    assert calls == [n for n in chunks if n >= 2]  # chunks of one token stay absorbed
    assert torch.equal(got_cache, want_cache)
    assert relative_error(got, want) < 1e-5


def test_expanded_form_masks_by_position_in_the_context(cpu_attention):
    """A later chunk's first query sees every earlier row and none of its own chunk's later ones: the
    mask is aligned to the context's end, not the chunk's start. Top-left alignment is off by far more
    than the tolerance above."""
    attn = cpu_attention
    xs = torch.randn(20, attn.kv_a_proj_with_mqa.in_features, generator=torch.Generator().manual_seed(1))
    want, _ = run_chunks(attn, xs, (8, 12), None)
    got, _ = run_chunks(attn, xs, (8, 12), 2)
    assert relative_error(got, want) < 1e-5
    key_rows = attn.kv_cache[:20]
    q_nope, q_rope, _ = attn._heads(xs[8:], attn.rope.rotations(8, 20, attn.device))
    with torch.inference_mode():
        query = torch.cat([q_nope, q_rope], -1).transpose(0, 1)[None]
        k_nope, values = attn.kv_b_proj.expand_keys_values(key_rows[:, :attn.kv_lora_rank])
        keys = torch.cat([k_nope, key_rows[:, None, attn.kv_lora_rank:].expand(-1, attn.n_heads, -1)], -1)
        top_left = torch.nn.functional.scaled_dot_product_attention(
            query, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], is_causal=True, scale=attn.scale)
        wrong = attn.o_proj(top_left[0].transpose(0, 1).reshape(12, -1))
    assert relative_error(wrong, want[8:]) > 1e-2


def test_expanded_form_steps_aside_past_its_byte_budget(cpu_attention, monkeypatch):
    attn = cpu_attention
    attn.expanded_min_tokens = 2
    row_bytes = attn.n_heads * (attn.nope_dim + attn.rope_dim + attn.v_dim) * 4
    monkeypatch.setattr(mla, "EXPANDED_MAX_BYTES", 10 * row_bytes)
    assert attn._expands(4, 10) and not attn._expands(4, 11) and not attn._expands(1, 5)
    attn.expanded_min_tokens = None
    assert not attn._expands(4, 10)


@needs_cuda
def test_expanded_form_on_cuda_at_the_shipped_threshold(tiny_model):
    attn = load_model(tiny_model(), device="cuda", optimize_config_path=default_rules_path(True),
                      max_context=MAX_CONTEXT).model.model.layers[0].self_attn
    assert attn.expanded_min_tokens == mla.EXPANDED_MIN_TOKENS
    n = mla.EXPANDED_MIN_TOKENS + 100
    xs = torch.randn(n + 40, attn.kv_a_proj_with_mqa.in_features, generator=torch.Generator().manual_seed(2))
    xs = xs.to("cuda", attn.dtype)
    want, want_cache = run_chunks(attn, xs, (40, n), None)
    got, got_cache = run_chunks(attn, xs, (40, n), mla.EXPANDED_MIN_TOKENS)
    assert torch.equal(got_cache, want_cache)
    assert relative_error(got, want) < 3e-2  # bfloat16 products in another order
