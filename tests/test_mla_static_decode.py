"""MLAttention.decode_static, the one-token step that util/cuda_graph.StaticDecoder captures in CUDA
graphs, gives the result of the eager `forward` and writes the same cache row, on the CPU (where the
absorbed matmuls take the weight-on-the-left layout) and on cuda, eagerly and replayed as a graph."""

import pytest
import torch

from ktransformers import kernels
from ktransformers.models.absorbed_kv_b import NativeAbsorbedKVB
from ktransformers.models.loader import load_model
from ktransformers.optimize.optimize import default_rules_path
from ktransformers.util.cuda_graph import MIN_WINDOW, capture_graph, context_window

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
MAX_CONTEXT = 32


def attention(tiny_model, device: str, arch: str = "deepseek_v3"):
    """Layer 0's attention of the tiny model placed by the shipped rules (cuda: bfloat16), and its inputs."""
    model = load_model(tiny_model(arch=arch), device=device, optimize_config_path=default_rules_path(device == "cuda"),
                       max_context=MAX_CONTEXT).model
    attn = model.model.layers[0].self_attn
    xs = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return attn, xs.to(attn.device, attn.dtype)


def relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def tolerance(attn) -> float:
    # bfloat16: decode_static reduces over all MAX_CONTEXT rows, forward over the live ones only.
    # A wrong position (rotation or mask) is off by ~0.4 (checked below, so the comparisons can fail).
    return 1e-5 if attn.dtype == torch.float32 else 5e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])  # q_lora query / plain q_proj
def test_decode_static_equals_forward_and_masks_rows_past_the_position(tiny_model, device, arch):
    attn, xs = attention(tiny_model, device, arch)
    if device == "cpu":
        assert isinstance(attn.kv_b_proj, NativeAbsorbedKVB)  # the CPU rules' native branch is what runs
    with torch.inference_mode():
        attn(xs[:6], 0)
        prefilled = attn.kv_cache.clone()
        expected = attn(xs[6:7], 6)
        expected_cache = attn.kv_cache.clone()

        attn.kv_cache.copy_(prefilled)
        garbage = 1e3 * torch.randn(MAX_CONTEXT - 7, attn.kv_cache.shape[1], generator=torch.Generator().manual_seed(1))
        attn.kv_cache[7:] = garbage  # rows past the position are masked out: they must not matter
        got = attn.decode_static(xs[6:7], torch.tensor([6], device=attn.device))
    assert torch.equal(attn.kv_cache[:7], expected_cache[:7])
    assert torch.equal(attn.kv_cache[7:], garbage.to(attn.device, attn.dtype))
    assert relative_error(got, expected) < tolerance(attn)
    with torch.inference_mode():
        attn.kv_cache.copy_(prefilled)
        wrong = attn.decode_static(xs[6:7], torch.tensor([5], device=attn.device))
    assert relative_error(wrong, expected) > 0.2


def test_cpu_decode_static_is_forward_over_the_live_rows_only(tiny_model):
    """On the CPU the position is read on the host and only rows 0..position are scored (the window
    of benchmarks/decode.py holds 4224 rows): rows past it are never read, even when they hold NaN."""
    attn, xs = attention(tiny_model, "cpu")
    with torch.inference_mode():
        attn(xs[:6], 0)
        prefilled = attn.kv_cache.clone()
        expected = attn(xs[6:7], 6)
        attn.kv_cache.copy_(prefilled)
        attn.kv_cache[7:] = float("nan")
        got = attn.decode_static(xs[6:7], torch.tensor([6]))
    assert torch.equal(got, expected)
    assert torch.isnan(attn.kv_cache[7:]).all() and not torch.isnan(attn.kv_cache[:7]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_a_window_scores_only_its_rows(tiny_model, device):
    """decode_static's masked form (what the CUDA graphs run; the CPU runs it here only) over a window
    of the first 8 cache rows: rows past the window are never read, even when they hold NaN, and the
    result is the eager forward's (two slots, one query each)."""
    attn, xs = attention(tiny_model, device)
    with torch.inference_mode():
        attn(xs[:6], 0)
        prefilled = attn.kv_cache.clone()
        expected = attn(xs[6:7], 6)
        attn.kv_cache.copy_(prefilled)
        attn.kv_cache[8:] = float("nan")
        position, slots = torch.tensor([6], device=attn.device), torch.tensor([0], device=attn.device)
        got = attn.decode_masked(xs[6:7], position, slots, window=8)
        with pytest.raises(ValueError, match="window"):
            attn.decode_masked(xs[6:7], position, slots, window=MAX_CONTEXT + 1)
    assert not torch.isnan(got).any()
    assert relative_error(got, expected) < tolerance(attn)
    assert torch.isnan(attn.kv_cache[8:]).all() and not torch.isnan(attn.kv_cache[:8]).any()


def test_context_window_covers_the_position_within_a_power_of_two():
    assert [context_window(p, 4224) for p in (0, 511, 512, 1023, 1024, 4095, 4096, 4223)] == \
        [512, 512, 1024, 1024, 2048, 4096, 4224, 4224]
    assert context_window(99, 300) == 300 and context_window(299, 300) == 300
    for max_context in (32, 300, 4224, 32768):
        for p in range(0, max_context, max(1, max_context // 97)):
            window = context_window(p, max_context)
            assert p < window <= max_context and (window == max_context or window <= max(MIN_WINDOW, 2 * p + 1))


@needs_cuda
def test_decode_static_replayed_as_a_cuda_graph_follows_the_position(tiny_model):
    attn, xs = attention(tiny_model, "cuda")
    x, position = torch.empty_like(xs[:1]), torch.zeros(1, dtype=torch.int64, device=attn.device)
    with torch.inference_mode():
        attn(xs[:4], 0)
        prefilled = attn.kv_cache.clone()
        x.copy_(xs[4:5])
        position.fill_(4)
        graph, out = capture_graph(lambda: attn.decode_static(x, position))

        attn.kv_cache.copy_(prefilled)
        replayed = []
        for pos in range(4, 12):  # one capture serves every position
            x.copy_(xs[pos:pos + 1])
            position.fill_(pos)
            graph.replay()
            replayed.append(out.clone())
        replayed_cache = attn.kv_cache.clone()

        attn.kv_cache.copy_(prefilled)
        eager = [attn(xs[pos:pos + 1], pos) for pos in range(4, 12)]
    assert torch.equal(replayed_cache, attn.kv_cache)
    for got, expected in zip(replayed, eager):
        assert relative_error(got, expected) < tolerance(attn)
    assert relative_error(replayed[0], eager[1]) > 0.2  # each replay read its own position
