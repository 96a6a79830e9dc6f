"""CPU MLA under the shipped CPU rules: the absorbed W_UK / W_UV come straight from the GGUF blocks
(attn_k_b + attn_v_b files: both; older fused attn_kv_b files: W_UV), and one-token attention runs
on the native pool in one call (kernels' mla_decode: prepare, W_UK, attention, W_UV).

Oracles: /proc/self/maps (the weights lie inside the GGUF file's mapping, so no float copy exists),
torch's own attention (`_attend`, with the native decode switched off), and the torch float32
reference rules (the path tests/test_model_vs_hf.py checks against transformers)."""

from pathlib import Path

import pytest
import torch

from ktransformers import kernels
from ktransformers.models import mla
from ktransformers.models.absorbed_kv_b import NativeAbsorbedKVB
from ktransformers.models.loader import load_model
from ktransformers.optimize import optimize

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")
CPU_RULES = optimize.RULES_DIR / "DeepSeek-V3-Chat-cpu.yaml"
TORCH_RULES = "- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n"


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module", params=[True, False], ids=["k_b+v_b", "fused kv_b"])
def models(request, tiny_model, tmp_path_factory):
    """(path of the tiny Q4_K_M GGUF, the model under the CPU rules, under the torch reference rules)."""
    torch_rules = tmp_path_factory.mktemp("rules") / "torch.yaml"
    torch_rules.write_text(TORCH_RULES)
    model_dir = tiny_model(quant_mix="q4_k_m", kv_b_split=request.param)
    loaded = [load_model(model_dir, model_dir, rules, device="cpu", max_context=32).model for rules in (CPU_RULES, torch_rules)]
    return request.param, model_dir / "model.gguf", *loaded


def test_absorbed_weights_are_read_from_the_file_mapping(models):
    split, path, native, _ = models
    ranges = mapped_ranges(path.resolve())
    assert ranges
    for layer in native.model.layers:
        kv_b = layer.self_attn.kv_b_proj
        assert isinstance(kv_b, NativeAbsorbedKVB)
        in_place = [kv_b.w_uk, kv_b.w_uv] if split else [kv_b.w_uv]
        for w in in_place:
            start, end = w.raw.data_ptr(), w.raw.data_ptr() + w.raw.numel()
            assert any(lo <= start and end <= hi for lo, hi in ranges)


def test_native_decode_step_equals_torch_attention(models, monkeypatch):
    _, _, native, _ = models
    attn = native.model.layers[0].self_attn
    calls = []
    real = attn.kv_b_proj.decode_step
    monkeypatch.setattr(attn.kv_b_proj, "decode_step", lambda *a: calls.append(a[6]) or real(*a))
    xs = torch.randn(6, native.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        attn(xs[:5], 0)
        assert calls == []  # a prefill chunk: not the one-call step
        fast = attn(xs[5:], 5)
        assert calls == [5]  # one native call (prepare, W_UK, attention over rows 0..5, W_UV)
        monkeypatch.setattr(mla, "native_attention", lambda cache: False)
        slow = attn(xs[5:], 5)  # rewrites the same cache row, then torch's attention
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_native_prefill_attention_equals_torch_attention(models, monkeypatch):
    """A first prefill chunk of at least NATIVE_PREFILL_MIN_TOKENS attends on the kernel pool
    (mla_prefill_attention), causally; later chunks keep torch's matmuls (where those are faster)."""
    _, _, native, _ = models
    attn = native.model.layers[0].self_attn
    calls = []
    real = kernels.mla_prefill_attention
    monkeypatch.setattr(kernels, "mla_prefill_attention", lambda *a: calls.append(a[2]) or real(*a))
    monkeypatch.setattr(mla, "NATIVE_PREFILL_MIN_TOKENS", 5)
    monkeypatch.setattr(mla, "_native_prefill_everywhere", False)
    xs = torch.randn(9, native.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        attn(xs[:4], 0)  # shorter than the threshold
        attn(xs[4:], 4)  # after earlier rows
        assert calls == []
        fast = attn(xs[:6], 0)
        assert calls == [6]
        monkeypatch.setattr(mla, "native_attention", lambda cache: False)
        slow = attn(xs[:6], 0)  # the same cache rows again, then torch's masked attention
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_where_the_kernel_pool_is_faster_every_prefill_chunk_attends_there(models, monkeypatch):
    """native_prefill_everywhere(): short first chunks and chunks after earlier rows attend on the
    kernel pool too, equal to torch's masked matmuls up to rounding."""
    _, _, native, _ = models
    attn = native.model.layers[0].self_attn
    calls = []
    real = kernels.mla_prefill_attention
    monkeypatch.setattr(kernels, "mla_prefill_attention", lambda *a: calls.append(a[2]) or real(*a))
    monkeypatch.setattr(mla, "_native_prefill_everywhere", True)
    xs = torch.randn(9, native.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        fast = [attn(xs[:4], 0), attn(xs[4:], 4)]  # a short first chunk, then one after its rows
        assert calls == [4, 5]
        monkeypatch.setattr(mla, "native_attention", lambda cache: False)
        slow = [attn(xs[:4], 0), attn(xs[4:], 4)]
    for got, expected in zip(fast, slow):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_the_prefill_attention_choice_can_be_forced(monkeypatch, value, expected):
    monkeypatch.setattr(mla, "_native_prefill_everywhere", None)
    monkeypatch.setattr(mla, "_kernel_pool_attends_faster", lambda: pytest.fail("timed despite the setting"))
    monkeypatch.setenv("KT_NATIVE_PREFILL_ATTENTION", value)
    assert mla.native_prefill_everywhere() is expected


def test_a_bad_prefill_attention_setting_is_named(monkeypatch):
    monkeypatch.setattr(mla, "_native_prefill_everywhere", None)
    monkeypatch.setenv("KT_NATIVE_PREFILL_ATTENTION", "yes")
    with pytest.raises(ValueError, match="KT_NATIVE_PREFILL_ATTENTION must be 0 or 1, got 'yes'"):
        mla.native_prefill_everywhere()


def test_unset_the_choice_is_timed_once(monkeypatch):
    monkeypatch.setattr(mla, "_native_prefill_everywhere", None)
    monkeypatch.delenv("KT_NATIVE_PREFILL_ATTENTION", raising=False)
    timed = []
    monkeypatch.setattr(mla, "_kernel_pool_attends_faster", lambda: timed.append(1) or True)
    assert mla.native_prefill_everywhere() is True and mla.native_prefill_everywhere() is True and timed == [1]


def test_the_timing_compares_both_forms(monkeypatch):
    """The probe times the kernel pool against torch's matmuls (tiny sizes here: emulated CPUs run it too)."""
    calls = []
    real_native, real_torch = kernels.mla_prefill_attention, mla.masked_attention
    monkeypatch.setattr(kernels, "mla_prefill_attention", lambda *a: calls.append("native") or real_native(*a))
    monkeypatch.setattr(mla, "masked_attention", lambda *a: calls.append("torch") or real_torch(*a))
    assert isinstance(mla._kernel_pool_attends_faster(heads=2, tokens=4, context=12), bool)
    assert calls.count("native") == calls.count("torch") == 4  # a warm-up and three timed calls each


def test_native_projection_equals_the_torch_steps(models):
    """kernels.mla_prepare (split, latent norm, rope, head-major query) gives the torch steps' query and
    cache rows: the same float32 arithmetic, up to rounding; for prefill chunks and single tokens."""
    _, _, native, _ = models
    attn = native.model.layers[0].self_attn
    assert attn._native_project
    xs = torch.randn(7, native.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for start, end in ((0, 7), (5, 6)):
            rotations = attn.rope.rotations(start, end, "cpu")
            fast = attn._project(xs[: end - start], rotations)
            attn._native_project = False
            try:
                slow = attn._project(xs[: end - start], rotations)
            finally:
                attn._native_project = True
            for got, expected in zip(fast, slow):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_native_attention_stays_within_quantization_error_of_the_reference(models):
    """Layer by layer on equal inputs (whole-model logits could differ by a flipped near-tied expert): the
    native kernels quantize activations to 8 bits, ~1 % per product; prefill and decode alike."""
    _, _, native, reference = models
    xs = torch.randn(12, native.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for got_layer, ref_layer in zip(native.model.layers, reference.model.layers):
            for start, end in ((0, 11), (11, 12)):
                got, expected = got_layer.self_attn(xs[start:end], start), ref_layer.self_attn(xs[start:end], start)
                assert rel_err(got, expected) < 3e-2, start


def check_greedy_decoding(model, reference, steps: int = 8) -> list[float]:
    """Prefill 12 tokens, then decode `steps` greedily (the reference's tokens): every step picks the
    reference's best token, and the steps' logits are within 5 % of the reference's, but for at most
    one: there a near-tied router choice may have flipped one expert of one layer (seen: one step at
    22 %, the next ones back at ~1 %). Returns the prefill's per-token relative errors."""
    ids = torch.arange(3, 15)[None]
    step_errors = []
    with torch.inference_mode():
        got, expected = model(ids, 0), reference(ids, 0)
        errors = sorted(rel_err(got[0, t], expected[0, t]) for t in range(ids.shape[1]))
        token = expected[:, -1:].argmax(-1)
        for pos in range(ids.shape[1], ids.shape[1] + steps):
            got, expected = model(token, pos), reference(token, pos)
            step_errors.append(rel_err(got, expected))
            assert got[0, -1].argmax() == expected[0, -1].argmax()
            token = expected[:, -1:].argmax(-1)
    assert sum(e >= 5e-2 for e in step_errors) <= 1 and sorted(step_errors)[steps // 2] < 3e-2, step_errors
    return errors


def test_greedy_decoding_picks_the_reference_tokens(models):
    _, _, native, reference = models
    errors = check_greedy_decoding(native, reference)
    assert errors[len(errors) // 2] < 3e-2


def test_native_decode_step_refuses_what_would_read_or_write_out_of_bounds(models):
    """The one-call decode checks its buffers against the position and its head stacks against the shapes:
    a ValueError naming the culprit, never a read or write past the end."""
    _, _, native, _ = models
    attn = native.model.layers[0].self_attn
    kv_b = attn.kv_b_proj
    x = torch.randn(1, native.config.hidden_size)
    with torch.inference_mode():
        kv, q = attn.kv_a_proj_with_mqa(x), attn._query(x)
        step = lambda cache, position, pairs=attn.rope.cpu_pairs(): kv_b.decode_step(
            q, kv, attn.kv_a_layernorm, pairs, attn.rope.interleaved, cache, position, attn.scale)
        width = attn.kv_lora_rank + attn.rope_dim
        assert step(torch.zeros(4, width), 3).shape == (1, attn.n_heads * attn.v_dim)
        with pytest.raises(ValueError, match="cache"):
            step(torch.zeros(3, width), 3)  # row 3 does not exist
        with pytest.raises(ValueError, match="rope_table"):
            step(torch.zeros(64, width), 40, attn.rope.cpu_pairs()[:40])
        swapped = kv_b.w_uv.native_args, kv_b.w_uk.native_args
        with pytest.raises(ValueError, match="w_uk"):
            kernels.require().mla_decode(q.numpy(), kv.numpy(), attn.n_heads, attn.nope_dim, attn.rope_dim,
                                         attn.kv_lora_rank, attn.kv_a_layernorm.weight.numpy(), 1e-6,
                                         attn.rope.cpu_pairs().numpy(), False, *swapped, attn.v_dim,
                                         torch.zeros(4, width).numpy(), 3, 1.0, torch.empty(1, 4096).numpy())
