"""Prefix reuse across requests: same tokens and logits as a cold run, the longest common prefix
and never more, several conversations in an LRU store, consistent after a disconnect."""

from __future__ import annotations

import pytest
import torch

from ktransformers.models.loader import load_model
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent, TokenEvent
from ktransformers.util.prefix_cache import PrefixCache, common_prefix
from ktransformers.util.utils import prefill_and_generate


@pytest.fixture(scope="module", params=["f32", "q4_k_m"])
def loaded(request, tiny_model):
    path = tiny_model(quant_mix=request.param)
    return load_model(path / "model.gguf", path, max_context=320)


def generate(loaded, ids, cache=None, max_new_tokens=10, chunk_size=512):
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=max_new_tokens,
                                       prefix_cache=cache, chunk_size=chunk_size))
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id is not None]
    return tokens, "".join(e.text for e in events if isinstance(e, TokenEvent)), finish


def chat(loaded, system, *user_turns_and_answers):
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(user_turns_and_answers):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return build_prompt_ids(loaded.tokenizer, messages)


def last_logits(loaded, ids, start=0):
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids[start:]]), start)[0, -1]


def test_a_follow_up_turn_prefills_only_its_new_tokens_and_matches_a_cold_run(loaded):
    cache = PrefixCache(loaded.model)
    system = "You are a careful assistant. " * 6
    turn1 = chat(loaded, system, "What is 12 + 30?")
    _, answer1, first = generate(loaded, turn1, cache)
    assert first.cached_tokens == 0
    # R1's template drops the reasoning of earlier answers: give the answer a think block to drop
    turn2 = chat(loaded, system, "What is 12 + 30?", "<think>add the tens</think>" + answer1, "And 7 * 6?")
    shared = common_prefix(loaded.model.cached_ids, turn2)
    assert 0 < shared < len(turn2)
    warm_tokens, warm_text, warm = generate(loaded, turn2, cache)
    assert warm.cached_tokens == shared and warm.prompt_tokens == len(turn2)
    cold_tokens, cold_text, cold = generate(loaded, turn2, None)
    assert cold.cached_tokens == 0
    assert (warm_tokens, warm_text) == (cold_tokens, cold_text)


def test_warm_logits_equal_cold_logits_across_chunk_boundaries(loaded):
    ids = chat(loaded, "Numbers follow. " * 10, "Count from one to twenty, please.")
    cold = last_logits(loaded, ids)
    cache = PrefixCache(loaded.model, capacity_tokens=0)  # the live sequence only
    for cut in (1, 17, len(ids) // 2, len(ids) - 1):
        list(prefill_and_generate(loaded.model, loaded.tokenizer, ids[:cut] + [7, 8, 9], max_new_tokens=1,
                                  prefix_cache=cache, chunk_size=5))
        assert cache.prepare(ids) == min(cut, len(ids) - 1)
        warm = last_logits(loaded, ids, start=min(cut, len(ids) - 1))
        torch.testing.assert_close(warm, cold, rtol=1e-4, atol=1e-4)
    assert loaded.model.cached_ids == ids


def test_the_same_prompt_again_reruns_only_its_last_token(loaded):
    cache = PrefixCache(loaded.model)
    ids = chat(loaded, "Be brief.", "Hello there!")
    first = generate(loaded, ids, cache)
    again = generate(loaded, ids, cache)
    assert again[2].cached_tokens == len(ids) - 1
    assert again[:2] == first[:2]


def test_two_conversations_take_turns_through_the_store(loaded):
    cache = PrefixCache(loaded.model, capacity_tokens=4096)
    a1 = chat(loaded, "System prompt of workspace A. " * 5, "First question of A?")
    b1 = chat(loaded, "Workspace B has another system prompt. " * 5, "First question of B?")
    _, answer_a, _ = generate(loaded, a1, cache)
    generate(loaded, b1, cache)
    assert any(s.ids[:len(a1)] == a1 for s in cache.stored)  # A was saved when B overwrote it
    a2 = chat(loaded, "System prompt of workspace A. " * 5, "First question of A?", answer_a, "Second question of A?")
    warm = generate(loaded, a2, cache)
    assert warm[2].cached_tokens >= len(a1) - 1
    assert warm[:2] == generate(loaded, a2, None)[:2]


def test_the_store_is_bounded_and_evicts_the_least_recently_used(loaded):
    prompts = [chat(loaded, f"Conversation number {i}. " * 4, "Hi!") for i in range(4)]
    capacity = 2 * max(len(p) for p in prompts) + 2 * 4  # two sequences (prompt + a few fed tokens)
    cache = PrefixCache(loaded.model, capacity_tokens=capacity)
    for ids in prompts:
        generate(loaded, ids, cache, max_new_tokens=3)
    assert cache.stored_tokens <= capacity
    held = [s.ids for s in cache.stored]
    assert len(held) == 2 and all(common_prefix(h, prompts[0]) < len(prompts[0]) for h in held)
    assert common_prefix(held[-1], prompts[2]) == len(prompts[2])  # the newest saved ones stay
    assert cache.prepare(prompts[1]) == len(prompts[1]) - 1        # restored from the store


def test_a_disconnect_mid_stream_leaves_only_rows_that_were_written(loaded):
    cache = PrefixCache(loaded.model)
    ids = chat(loaded, "Tell a long story.", "Once upon a time?")
    gen = prefill_and_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=20, prefix_cache=cache)
    got = [next(gen).token_id for _ in range(3)]
    gen.close()  # the client went away
    assert loaded.model.cached_ids == ids + got[:2]  # the third token was sampled, never fed
    follow_up = ids + got + [5, 6]
    warm = generate(loaded, follow_up, cache)
    assert warm[2].cached_tokens == len(ids) + 2
    # bf16 on the GPU: rows written by decode steps differ from prefilled ones in the last bits, enough
    # to flip near-ties of random weights, so tokens are compared where the cache is float32
    if loaded.model.kv_caches()[0].dtype == torch.float32:
        assert warm[:2] == generate(loaded, follow_up, None)[:2]


def test_capacity_must_not_be_negative(loaded):
    with pytest.raises(ValueError, match="capacity_tokens"):
        PrefixCache(loaded.model, capacity_tokens=-1)


@pytest.fixture(scope="module")
def two_slots(tiny_model):
    path = tiny_model(quant_mix="f32")
    return load_model(path / "model.gguf", path, max_context=320, max_batch=2)


def slot_logits(loaded, ids, slot, start=0):
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids[start:]]), start, slot=slot)[0, -1]


def test_a_shared_system_prompt_is_copied_from_the_other_slot(two_slots):
    """Two users of one long system prompt (a RAG workspace): the second reuses the first's rows."""
    cache = PrefixCache(two_slots.model, capacity_tokens=0)
    system = "Answer from the attached manual only. " * 8
    first, second = chat(two_slots, system, "How do I reset it?"), chat(two_slots, system, "Where is the fuse?")
    assert cache.prepare(first, slot=0) == 0
    slot_logits(two_slots, first, 0)
    shared = common_prefix(first, second)
    assert cache.prepare(second, slot=1) == shared > 20
    assert two_slots.model.slot_ids[1] == second[:shared] and two_slots.model.slot_ids[0] == first
    warm = slot_logits(two_slots, second, 1, start=shared)
    cold = slot_logits(two_slots, second, 0)  # slot 0 rewritten from scratch: the cold reference
    torch.testing.assert_close(warm, cold, rtol=1e-5, atol=1e-5)


def test_each_conversation_goes_back_to_the_slot_that_holds_it(two_slots):
    cache = PrefixCache(two_slots.model, capacity_tokens=0)
    a = chat(two_slots, "Workspace A. " * 6, "Question one?")
    b = chat(two_slots, "Workspace B, another prompt. " * 6, "Question one?")
    for slot, ids in ((0, a), (1, b)):
        cache.prepare(ids, slot)
        slot_logits(two_slots, ids, slot)
    assert cache.pick_slot(a + [5, 6], [0, 1]) == 0 and cache.pick_slot(b + [7], [0, 1]) == 1
    assert cache.pick_slot(a + [5], [1]) == 1  # only a free slot can be picked
    fresh = chat(two_slots, "Nothing shared here.", "Hi")
    cache.prepare(a + [5], 0)
    assert cache.pick_slot(fresh, [0, 1]) == 1  # no prefix anywhere: the least recently used slot
