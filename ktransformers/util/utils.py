"""prefill_and_generate: run a prompt through the model and stream the answer as events.

The model contract (docs/DEVELOPING.md): `model(input_ids [1, T], start_pos) -> logits
[1, T, vocab]` with its own static cache and `model.max_context`. The prompt is prefilled
in chunks, then tokens are decoded one at a time. The generator does its work only while
it is being iterated, so closing it (or dropping it) stops the model at once.
"""

from collections.abc import Iterator, Sequence

import torch

from ktransformers.util.events import ContextLengthError, FinishEvent, TokenEvent
from ktransformers.util.logprobs import LogprobReporter
from ktransformers.util.reasoning import THINK_OPEN, ReasoningSplitter
from ktransformers.util.sampling import Sampler, SamplingParams
from ktransformers.util.sequence import DEFAULT_PREFILL_CHUNK, Forward, run_prefill, sequence_steps
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
    chunk_size: int | None = None,
    eos_token_ids=None,
    generation_config=None,
    hide_control_tokens: bool = True,
    prefix_cache=None,
    top_logprobs: int | None = None,
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
    earlier request left; without it the prompt is prefilled from position 0. `top_logprobs` None
    computes no log-probabilities; 0..20 gives each TokenEvent a `logprob` (util/logprobs.py: the
    model's log-softmax for the chosen token and that many alternatives). `constraint`
    (util/constrained.py) masks the logits before each token is sampled (`mask(logits) -> logits`)
    and is told each token taken (`accept(token)`). `tool_calls` (a util.tool_calls.ToolCallParser)
    takes the tokens of tool-call sections: they come out as ToolCallEvents, not text, and an answer
    that ends after a complete call finishes with "tool_calls". Bad arguments raise ValueError
    before any model call.
    """
    steps = generation_steps(model, tokenizer, inputs, max_new_tokens, sampling, stop, force_think, chunk_size,
                             eos_token_ids, generation_config, hide_control_tokens, top_logprobs=top_logprobs,
                             constraint=constraint, tool_calls=tool_calls,
                             reuse=None if prefix_cache is None else prefix_cache.prepare)
    return run_steps(model, steps)


def generation_steps(model, tokenizer, inputs, max_new_tokens: int = 512, sampling: SamplingParams | None = None,
                     stop=None, force_think: bool = False, chunk_size: int | None = None, eos_token_ids=None,
                     generation_config=None, hide_control_tokens: bool = True, top_logprobs: int | None = None,
                     constraint=None, tool_calls=None, reuse=None, slot: int = 0):
    """prefill_and_generate's sequence as util.sequence.sequence_steps: events interleaved with the
    model passes it needs (Forward), for a driver to run (`run_steps`, or the server's batch scheduler).
    `reuse(prompt_ids) -> cached tokens` restores a cached prefix into the sequence's slot first."""
    prompt_ids = _as_id_list(inputs)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
    if chunk_size is None:  # the model's choice (the loader raises it where long chunks pay)
        chunk_size = getattr(model, "prefill_chunk", DEFAULT_PREFILL_CHUNK)
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
    return sequence_steps(
        model, prompt_ids, max_new_tokens=max_new_tokens, max_context=max_context, sampler=Sampler(sampling, prompt_ids),
        stop_matcher=StopStringMatcher(stop),
        splitter=ReasoningSplitter(force_think or prompt_ends_in_reasoning(tokenizer, prompt_ids)),
        detokenizer=IncrementalDetokenizer(tokenizer, hide_control_tokens), chunk_size=chunk_size, eos_ids=eos_ids,
        reporter=LogprobReporter(tokenizer, top_logprobs) if top_logprobs is not None else None,
        constraint=constraint, tool_calls=tool_calls, reuse=reuse, slot=slot)


def run_steps(model, steps) -> Iterator[TokenEvent | ToolCallEvent | FinishEvent]:
    """Drive one sequence's steps alone: run each pass it asks for, yield its events. Nothing runs
    until iterated; closing this generator closes the steps."""
    try:
        for item in steps:
            if isinstance(item, Forward):
                run_prefill(item)
            else:
                yield item
    finally:
        steps.close()
