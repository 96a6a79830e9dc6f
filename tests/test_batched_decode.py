"""A batched decode step (`model.decode`: one token of each of several sequences, each in its own
cache slot) gives every sequence what it gets alone: the same greedy tokens and logits within float
tolerance, whatever the slots, their order and the sequences' lengths. CPU (the eager forward) and,
where a GPU exists, the hybrid StaticDecoder with per-batch-size CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from ktransformers import kernels
from ktransformers.models.loader import load_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PROMPTS = [[1, 17, 33, 9, 41, 5, 77, 12], [1, 250, 3], [1, 8, 8, 19, 64, 101, 7, 7, 300, 2, 45, 90, 11]]
STEPS = 6


def load(tiny_model, quant_mix: str, max_batch: int, device: str = "cpu"):
    path = tiny_model(quant_mix=quant_mix)
    return load_model(path / "model.gguf", path, max_context=64, device=device, max_batch=max_batch).model


def solo_run(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their logits for one sequence alone in slot 0, one-token forwards."""
    logits = model(torch.tensor([prompt]), 0)[0, -1]
    tokens, seen = [], []
    for i in range(STEPS):
        token = int(logits.argmax())
        tokens.append(token)
        logits = model(torch.tensor([[token]]), len(prompt) + i)[0, -1]
        seen.append(logits.float().cpu())
    return tokens, torch.stack(seen)


def batched_run(model, prompts: list[list[int]], slots: list[int], forced=None):
    """Each prompt prefilled into its slot, then STEPS batched decode steps of all of them together;
    greedy, or feeding forced[b] (teacher forcing: bfloat16 near-ties cannot make sequences diverge)."""
    last = torch.stack([model(torch.tensor([p]), 0, slot=s)[0, -1] for p, s in zip(prompts, slots)])
    tokens, seen = [[] for _ in prompts], []
    for i in range(STEPS):
        step_tokens = [int(row.argmax()) if forced is None else forced[b][i] for b, row in enumerate(last)]
        for b, token in enumerate(step_tokens):
            tokens[b].append(token)
        last = model.decode(step_tokens, [len(p) + i for p in prompts], slots)
        seen.append(last.float().cpu())
    return tokens, torch.stack(seen, dim=1)  # [B, STEPS, vocab]


def assert_batch_equals_solo(batched_model, solo_model, slots, atol, greedy=True):
    solo = [solo_run(solo_model, prompt) for prompt in PROMPTS]
    tokens, logits = batched_run(batched_model, PROMPTS, slots, None if greedy else [t for t, _ in solo])
    for b, (prompt, (solo_tokens, solo_logits)) in enumerate(zip(PROMPTS, solo)):
        assert tokens[b] == solo_tokens, f"sequence {b} in slot {slots[b]} diverged from its solo run"
        torch.testing.assert_close(logits[b], solo_logits, rtol=0, atol=atol)
        assert batched_model.slot_ids[slots[b]] == prompt + tokens[b]  # the fed tokens, not the last sampled


@pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("quant_mix", ["f32", "q4_k_m"])
@pytest.mark.parametrize("slots", [[0, 1, 2], [2, 0, 1], [3, 1, 0]])
def test_cpu_batched_decode_equals_each_sequence_alone(tiny_model, quant_mix, slots):
    batched = load(tiny_model, quant_mix, max_batch=4)
    solo = load(tiny_model, quant_mix, max_batch=1)
    if quant_mix == "f32":  # float kernels: one row's arithmetic is the same alone or in a group
        assert_batch_equals_solo(batched, solo, slots, atol=2e-4)
    else:
        # the k-quant kernels sum a group of tokens in another order than one token (dot_kquants.inc);
        # the int8 requantization of the next layer's input turns last-bit differences into ~1e-2,
        # so the solo tokens are fed (a near-tie must not make a sequence diverge). Another slot's
        # rows or position would move the logits by ~0.3 (their spread).
        assert_batch_equals_solo(batched, solo, slots, atol=3e-2, greedy=False)


def test_sequences_in_other_slots_do_not_disturb_each_other(tiny_model):
    """Decoding slot 1 alone in between leaves slot 0's rows as they were: its next step is unchanged."""
    model = load(tiny_model, "f32", max_batch=2)
    a, b = PROMPTS[0], PROMPTS[2]
    model(torch.tensor([a]), 0, slot=0)
    expected = model.decode([5], [len(a)], [0])
    model(torch.tensor([b]), 0, slot=1)
    for i in range(3):
        model.decode([9 + i], [len(b) + i], [1])
    torch.testing.assert_close(model.decode([5], [len(a)], [0]), expected, rtol=0, atol=0)


def test_decode_refuses_bad_batches(tiny_model):
    model = load(tiny_model, "f32", max_batch=2)
    with pytest.raises(ValueError, match="own cache slot"):
        model.decode([1, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="slot 2 does not exist"):
        model.decode([1], [0], [2])
    with pytest.raises(ValueError, match="as many positions and slots"):
        model.decode([1, 2], [0], [0, 1])
    with pytest.raises(ValueError, match="context window"):
        model.decode([1], [64], [0])
    with pytest.raises(ValueError, match="slot 5 does not exist"):
        model(torch.tensor([[1, 2]]), 0, slot=5)


@needs_cuda
@pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("slots", [[0, 1, 2], [2, 3, 0]])
def test_hybrid_graphed_batched_decode_equals_each_sequence_alone(tiny_model, slots):
    batched = load(tiny_model, "q4_k_m", max_batch=4, device="cuda")
    solo = load(tiny_model, "q4_k_m", max_batch=1, device="cuda")
    assert batched.step_decoder is not None and batched.step_decoder.use_graphs
    # bfloat16: other batch shapes may round differently in the last bits, so the solo tokens are fed
    assert_batch_equals_solo(batched, solo, slots, atol=5e-2, greedy=False)
    assert any(n == len(slots) for n, _ in batched.step_decoder.plans) and batched.step_decoder.graphs_captured


@pytest.mark.parametrize("quant_mix", ["f32", "q4_k_m"])
def test_last_only_prefill_gives_the_last_logits_and_the_same_cache(tiny_model, quant_mix):
    """forward(last_only=True), what a prefill runs: only the last token's logits, the same as a full
    forward's last row, and the same cache rows (a decode step after each agrees)."""
    full_model, pruned_model = (load(tiny_model, quant_mix, 1) for _ in range(2))
    prompt = torch.tensor([PROMPTS[2]])
    full = full_model(prompt, 0)
    pruned = pruned_model(prompt, 0, last_only=True)
    assert full.shape[1] == prompt.shape[1] and pruned.shape[:2] == (1, 1)
    torch.testing.assert_close(pruned[0, 0], full[0, -1], rtol=1e-5, atol=1e-5)
    for full_cache, pruned_cache in zip(full_model.kv_caches(), pruned_model.kv_caches()):
        torch.testing.assert_close(pruned_cache[:prompt.shape[1]], full_cache[:prompt.shape[1]], rtol=0, atol=0)
    step = torch.tensor([[int(full[0, -1].argmax())]])
    torch.testing.assert_close(pruned_model(step, prompt.shape[1]), full_model(step, prompt.shape[1]), rtol=0, atol=0)
    assert pruned_model.cached_ids == full_model.cached_ids == PROMPTS[2] + step[0].tolist()
