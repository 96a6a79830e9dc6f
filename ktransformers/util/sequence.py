"""One sequence's generation as a generator that asks for model passes instead of making them.

    for item in sequence_steps(model, prompt_ids, ...):
        if isinstance(item, Forward):   # run item.ids at item.start_pos of cache slot item.slot and set
            run_prefill(item)           # item.logits (its last token's) before asking for the next item
        else:                           # a TokenEvent or the final FinishEvent
            ...

Sampling, stop strings, detokenizing, the reasoning split and the timings live here once; who runs
the passes is the driver's business: util/utils.run_steps runs one sequence alone
(prefill_and_generate), the server's scheduler runs the decode steps of many sequences as one
batched pass (server/scheduler.py). The result rides on the Forward itself, so code that wraps the
steps (`for item in steps: yield item`) passes requests and results through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ktransformers.util.events import FinishEvent, TokenEvent

# Prompt tokens per prefill pass unless the model asks for another (its `prefill_chunk`)
DEFAULT_PREFILL_CHUNK = 512

if TYPE_CHECKING:
    from ktransformers.util.tool_calls import ToolCallEvent


@dataclass(eq=False)
class Forward:
    """A model pass a sequence needs: `ids` at positions start_pos.. of cache slot `slot` of `model`
    (a prefill chunk, or one decode token); the driver sets `logits` [vocab], the last token's."""

    model: Any
    ids: list[int]
    start_pos: int
    slot: int
    prefill: bool
    logits: torch.Tensor | None = None


def run_prefill(forward: Forward) -> None:
    """Run one sequence's pass alone. Slot 0 is the model contract's default, so single-sequence
    models (test stand-ins) need no slot argument."""
    # Ids stay on the CPU: the model's embedding looks them up where its table lives.
    ids = torch.tensor([forward.ids], dtype=torch.long)
    # only the last token's logits are sampled from: models that can skip the others' last MLP and head do
    extra = {"last_only": True} if getattr(forward.model, "supports_last_only", False) else {}
    if forward.slot:
        extra["slot"] = forward.slot
    with torch.inference_mode():
        out = forward.model(ids, forward.start_pos, **extra)
    forward.logits = out[0, -1]


def run_decode(forwards: list[Forward]) -> None:
    """One decode token of each of several sequences of one model, as one batched pass (one pass each
    for models without `decode`: single-sequence stand-ins)."""
    model = forwards[0].model
    if not hasattr(model, "decode"):
        for forward in forwards:
            run_prefill(forward)
        return
    logits = model.decode([f.ids[0] for f in forwards], [f.start_pos for f in forwards], [f.slot for f in forwards])
    for forward, row in zip(forwards, logits):
        forward.logits = row


def sequence_steps(model, prompt_ids: list[int], *, max_new_tokens: int, max_context: int, sampler, stop_matcher,
                   splitter, detokenizer, chunk_size: int, eos_ids: set[int], reporter=None,
                   constraint=None, tool_calls=None, reuse: Callable[[list[int]], int] | None = None,
                   slot: int = 0) -> Iterator[TokenEvent | ToolCallEvent | FinishEvent | Forward]:
    """The steps of one generation (arguments checked by util.utils.generation_steps).

    `reuse(prompt_ids)`, called when the steps start, restores a cached prefix into the slot and
    returns its length; those prompt tokens are not run again. `reporter` (util/logprobs.py), when
    given, puts each token's log-probability on its TokenEvent. `constraint` masks the logits before
    each draw and is told each token taken; `tool_calls` (util/tool_calls.ToolCallParser) takes the
    tokens of tool-call sections and turns them into ToolCallEvents (see prefill_and_generate).
    """
    def pick(logits: torch.Tensor) -> int:
        if constraint is None:
            return sampler.sample(logits)
        token = sampler.sample(constraint.mask(logits))
        constraint.accept(token)
        return token

    # The whole sequence (prompt + answer) must fit in the context window.
    budget = min(max_new_tokens, max_context - len(prompt_ids))

    def event(token_id, text, final=False, logprob=None):
        shown = stop_matcher.push(text)
        if final and not stop_matcher.stopped:
            shown += stop_matcher.flush()
        reasoning, content = splitter.push(shown)
        if final or stop_matcher.stopped:
            tail_reasoning, tail_content = splitter.flush()
            reasoning, content = reasoning + tail_reasoning, content + tail_content
        return TokenEvent(token_id, shown, reasoning, content, logprob)

    started = time.perf_counter()
    cached = reuse(prompt_ids) if reuse is not None else 0
    for start in range(cached, len(prompt_ids), chunk_size):
        forward = Forward(model, prompt_ids[start:start + chunk_size], start, slot, prefill=True)
        yield forward
    logits = forward.logits
    token = pick(logits)
    prefill_seconds = time.perf_counter() - started

    decode_seconds, decode_steps, completion = 0.0, 0, 0
    finish_reason = "length"
    in_calls = False
    while token not in eos_ids:
        completion += 1
        last = completion == budget
        calls = tool_calls.push(token) if tool_calls is not None else None
        if calls is not None:   # a tool-call token: the parser's, never text
            if not in_calls:    # the text before the calls goes out first, whole
                tail = event(None, detokenizer.flush(), final=True)
                if tail.text or tail.reasoning or tail.content:
                    yield tail
            in_calls = True
            yield from calls
        else:
            in_calls = False
            text = detokenizer.push(token) + (detokenizer.flush() if last else "")
            # `logits` are still those `token` was sampled from
            out = event(token, text, final=last, logprob=reporter.entry(logits, token) if reporter else None)
            if stop_matcher.stopped:
                finish_reason = "stop"
                if out.text or out.reasoning or out.content or out.logprob:
                    yield out
                break
            yield out
        if last:
            break
        started = time.perf_counter()
        forward = Forward(model, [token], len(prompt_ids) + completion - 1, slot, prefill=False)
        yield forward
        logits = forward.logits
        token = pick(logits)
        decode_seconds += time.perf_counter() - started
        decode_steps += 1
    else:
        # An end-of-sequence token: release anything still held back.
        finish_reason = "tool_calls" if tool_calls is not None and tool_calls.completed else "stop"
        tail = event(None, detokenizer.flush(), final=True)
        if tail.text or tail.reasoning or tail.content:
            yield tail
    yield FinishEvent(
        finish_reason=finish_reason,
        prompt_tokens=len(prompt_ids),
        completion_tokens=completion,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        prefill_tokens_per_s=(len(prompt_ids) - cached) / prefill_seconds if prefill_seconds > 0 else 0.0,
        decode_tokens_per_s=decode_steps / decode_seconds if decode_seconds > 0 else 0.0,
        cached_tokens=cached,
    )
