"""The engine's generate_fn for a real model: prompt ids, context check, the sequence's steps, and the
model passes the engine's scheduler runs (one sequence's prefill chunk, batched decode steps).

Tokenizing runs on the request's thread (`ModelBackend.prepare`), the model on the engine worker.
Clients never see control tokens (<｜Assistant｜>, <｜end▁of▁sentence｜>...): prefill_and_generate
hides them (hide_control_tokens, on by default).
"""

from __future__ import annotations

import threading

from ktransformers.models.hybrid_moe import streams_prefill_experts
from ktransformers.models.loader import LoadedModel
from ktransformers.server.engine import GenerateFn, GenerationRequest, PromptAccepted
from ktransformers.server.scheduler import DEFAULT_PREFILL_SLICE
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import ContextLengthError
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.prefix_cache import PrefixCache
from ktransformers.util.structured import StructuredOutput
from ktransformers.util.utils import eos_ids_for, generation_steps, prompt_ends_in_reasoning

# About 1.1 GB of host RAM for DeepSeek-V3's bf16 cache rows (70 KB a token), 2.3 GB in float32.
DEFAULT_CACHE_TOKENS = 16384


def prompt_ids_for(loaded: LoadedModel, request: GenerationRequest,
                   structured: StructuredOutput | None = None) -> list[int]:
    if request.messages is not None:
        messages, tools = request.messages, None
        if structured is not None:   # tools described in the prompt, or handed to a template that renders them
            messages, tools = structured.prompt_messages(messages, request.output_rules)
        return build_prompt_ids(loaded.tokenizer, messages, request.force_think, tools)
    return loaded.tokenizer.encode(request.prompt, add_special_tokens=True)


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry: no token's text is longer (a byte-level token
    string has one character per byte), so a prompt of n characters needs at least n / this tokens."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


class ModelBackend:
    """The engine's generate_fn. `prepare` (tokenize, context check) runs on the request thread,
    one at a time, so a long prompt never holds up the model; the model runs on the worker."""

    def __init__(self, loaded: LoadedModel, cache_tokens: int = DEFAULT_CACHE_TOKENS):
        self.loaded = loaded
        # only the engine worker touches the cache (one round at a time), so it needs no lock; models without
        # a reusable cache (test stand-ins) prefill every prompt from the start
        reusable = hasattr(loaded.model, "kv_caches")
        self.prefix_cache = PrefixCache(loaded.model, cache_tokens) if cache_tokens > 0 and reusable else None
        # grammar masks cover the lm_head's width (DeepSeek-V3: 129280, more than the tokenizer's ids)
        vocab_size = int(getattr(loaded.config, "vocab_size", 0) or len(loaded.tokenizer))
        self.structured = StructuredOutput(loaded.tokenizer, vocab_size,
                                           eos_ids_for(loaded.tokenizer, loaded.generation_config))
        self._tokenizing = threading.Lock()

    @property
    def max_context(self) -> int:
        return int(self.loaded.model.max_context)

    def prepare(self, request: GenerationRequest) -> None:
        with self._tokenizing:
            ids = prompt_ids_for(self.loaded, request, self.structured)
        if len(ids) >= self.max_context:
            raise ContextLengthError(len(ids), self.max_context)
        # grammars compile here, on the request thread (FieldError: the request's fault)
        request.output_plan = self.structured.plan(request.output_rules,
                                                   prompt_ends_in_reasoning(self.loaded.tokenizer, ids))
        request.prompt_ids = ids

    def __call__(self, request: GenerationRequest):
        return self._generate(request)

    def _generate(self, request: GenerationRequest):
        """The request's events and the model passes it needs (util.sequence.Forward) in its cache slot,
        for the engine's scheduler to run."""
        if request.prompt_ids is None:
            self.prepare(request)
        ids, loaded = request.prompt_ids, self.loaded
        yield PromptAccepted(len(ids))   # lets the HTTP headers go out before the (long) prefill
        sampling = SamplingParams.from_generation_config(loaded.generation_config, **request.sampling)
        plan = request.output_plan
        reuse = None
        if self.prefix_cache is not None:
            reuse = lambda prompt: self.prefix_cache.prepare(prompt, request.slot)  # noqa: E731
        yield from generation_steps(loaded.model, loaded.tokenizer, ids, request.max_new_tokens,
                                    sampling=sampling, stop=request.stop or None, force_think=request.force_think,
                                    generation_config=loaded.generation_config, reuse=reuse, slot=request.slot,
                                    top_logprobs=request.top_logprobs,
                                    constraint=plan.constraint if plan else None,
                                    tool_calls=plan.parser() if plan else None)

    def pick_slot(self, request: GenerationRequest, free_slots: list[int]) -> int:
        """The free cache slot to run the request in: the one holding most of its prompt."""
        if self.prefix_cache is None or request.prompt_ids is None:
            return free_slots[0]
        return self.prefix_cache.pick_slot(request.prompt_ids, free_slots)


def default_prefill_slice(model) -> int | None:
    """Prompt tokens a scheduler round while other streams decode: DEFAULT_PREFILL_SLICE, or whole
    chunks (None) where long chunks stream the routed experts to the GPU: each pass streams every
    expert again whatever its length, so slices would multiply the newcomer's prefill time (a
    4096-token chunk cut in 128s: 32 streams of every expert instead of one)."""
    return None if streams_prefill_experts(model) else DEFAULT_PREFILL_SLICE


def model_generate_fn(loaded: LoadedModel, cache_tokens: int = DEFAULT_CACHE_TOKENS) -> GenerateFn:
    """`cache_tokens`: rows of other conversations the prefix cache keeps (0: no prefix reuse)."""
    return ModelBackend(loaded, cache_tokens)
