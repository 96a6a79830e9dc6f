"""prefill_and_generate: run a prompt through the model and stream the answer as events.

The model contract (docs/DEVELOPING.md): `model(input_ids [1, T], start_pos) -> logits
[1, T, vocab]` with its own static cache and `model.max_context`. The prompt is prefilled
in chunks, then tokens are decoded one at a time. The generator does its work only while
it is being iterated, so closing it (or dropping it) stops the model at once.
"""

import time
from collections.abc import Iterator, Sequence

import torch

from ktransformers.util.events import ContextLengthError, FinishEvent, TokenEvent
from ktransformers.util.reasoning import THINK_OPEN, ReasoningSplitter
from ktransformers.util.sampling import Sampler, SamplingParams
from ktransformers.util.stop_strings import StopStringMatcher
from ktransformers.util.text_stream import IncrementalDetokenizer
from ktransformers.util.tool_calls import ToolCallEvent


def _as_id_list(inputs) -> list[int]:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 2 and inputs.shape[0] == 1:
            inputs = inputs[0]
        if inputs.dim() != 1 or inputs.dtype.is_floating_point or inputs.dtype == torch.bool:
            raise ValueError(f"inputs must be an integer tensor of shape [1, T], got "
                             f"{inputs.dtype} {tuple(inputs.shape)}")
        ids = inputs.tolist()
    elif isinstance(inputs, Sequence) and not isinstance(inputs, str):
        ids = list(inputs)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("inputs must be a list of integer token ids")
    else:
        raise ValueError(f"inputs must be a LongTensor [1, T] or a list of token ids, "
                         f"got {type(inputs).__name__}")
    if not ids:
        raise ValueError("inputs is empty: the prompt needs at least one token")
    return ids


def _ids_from(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def eos_ids_for(tokenizer, generation_config=None) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation_config."""
    ids = _ids_from(getattr(tokenizer, "eos_token_id", None))
    if generation_config is not None:
        eos = (generation_config.get("eos_token_id") if isinstance(generation_config, dict)
               else getattr(generation_config, "eos_token_id", None))
        ids |= _ids_from(eos)
    return ids


def prompt_ends_in_reasoning(tokenizer, prompt_ids: list[int]) -> bool:
    """True when the prompt already opened a <think> block (so the answer starts in it)."""
    tail = tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False)
    return tail.rstrip().endswith(THINK_OPEN)


def prefill_and_generate(
    model,
    tokenizer,
    inputs,
    max_new_tokens: int = 512,
    sampling: SamplingParams | None = None,
    stop=None,
    force_think: bool = False,
    chunk_size: int = 512,
    eos_token_ids=None,
    generation_config=None,
    hide_control_tokens: bool = True,
    prefix_cache=None,
    constraint=None,
    tool_calls=None,
) -> Iterator[TokenEvent | ToolCallEvent | FinishEvent]:
    """Yield a TokenEvent per generated token, then one FinishEvent.

    `sampling` None means greedy. `stop` is a string or list of strings. `force_think`
    (or a prompt ending in "<think>") starts the stream in reasoning mode. `eos_token_ids`
    defaults to the tokenizer's eos plus `generation_config.eos_token_id` (the model's
    own `generation_config` attribute when not given). `hide_control_tokens` keeps special tokens
    such as <｜Assistant｜> out of the text (never <think>/</think>). `prefix_cache` (a
    util.prefix_cache.PrefixCache over this model) skips the prompt tokens whose cache rows an
    earlier request left; without it the prompt is prefilled from position 0. `constraint`
    (util/constrained.py) masks the logits before each token is sampled (`mask(logits) -> logits`)
    and is told each token taken (`accept(token)`). `tool_calls` (a util.tool_calls.ToolCallParser)
    takes the tokens of tool-call sections: they come out as ToolCallEvents, not text, and an answer
    that ends after a complete call finishes with "tool_calls". Bad arguments raise ValueError
    before any model call.
    """
    prompt_ids = _as_id_list(inputs)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be an integer >= 1")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__}")
    max_context = int(model.max_context)
    if len(prompt_ids) >= max_context:
        raise ContextLengthError(len(prompt_ids), max_context)
    if eos_token_ids is None:
        eos_ids = eos_ids_for(tokenizer, generation_config or getattr(model, "generation_config", None))
    else:
        eos_ids = _ids_from(eos_token_ids)
    stop_matcher = StopStringMatcher(stop)
    detokenizer = IncrementalDetokenizer(tokenizer, hide_control_tokens)
    return _generate(model, tokenizer, prompt_ids, max_new_tokens, max_context, sampling,
                     stop_matcher, force_think, chunk_size, eos_ids, detokenizer, prefix_cache,
                     constraint, tool_calls)


def _generate(model, tokenizer, prompt_ids, max_new_tokens, max_context, sampling,
              stop_matcher, force_think, chunk_size, eos_ids, detokenizer, prefix_cache,
              constraint, tool_calls):
    sampler = Sampler(sampling, prompt_ids)

    def pick(logits: torch.Tensor) -> int:
        if constraint is None:
            return sampler.sample(logits)
        token = sampler.sample(constraint.mask(logits))
        constraint.accept(token)
        return token

    splitter = ReasoningSplitter(force_think or prompt_ends_in_reasoning(tokenizer, prompt_ids))
    # The whole sequence (prompt + answer) must fit in the context window.
    budget = min(max_new_tokens, max_context - len(prompt_ids))

    def forward(ids: list[int], start_pos: int) -> torch.Tensor:
        # Ids stay on the CPU: the model's embedding looks them up where its table lives.
        with torch.inference_mode():
            return model(torch.tensor([ids], dtype=torch.long), start_pos)[0, -1]

    def event(token_id, text, final=False):
        shown = stop_matcher.push(text)
        if final and not stop_matcher.stopped:
            shown += stop_matcher.flush()
        reasoning, content = splitter.push(shown)
        if final or stop_matcher.stopped:
            tail_reasoning, tail_content = splitter.flush()
            reasoning, content = reasoning + tail_reasoning, content + tail_content
        return TokenEvent(token_id, shown, reasoning, content)

    started = time.perf_counter()
    cached = prefix_cache.prepare(prompt_ids) if prefix_cache is not None else 0
    for start in range(cached, len(prompt_ids), chunk_size):
        logits = forward(prompt_ids[start:start + chunk_size], start)
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
            out = event(token, text, final=last)
            if stop_matcher.stopped:
                finish_reason = "stop"
                if out.text or out.reasoning or out.content:
                    yield out
                break
            yield out
        if last:
            break
        started = time.perf_counter()
        logits = forward([token], len(prompt_ids) + completion - 1)
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
