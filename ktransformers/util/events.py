"""Events yielded by `prefill_and_generate` (see docs/DEVELOPING.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ktransformers.util.logprobs import TokenLogprob


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_context: int):
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the model's context window is {max_context} "
            f"tokens, leaving no room to generate (shorten the prompt or raise max_context)"
        )


@dataclass(frozen=True)
class TokenEvent:
    """One generated token.

    `text` is the UTF-8-safe delta of the raw output (tags included); `reasoning` and
    `content` split what the think/answer splitter released at this step, tags removed.
    Text that was held back (an incomplete character, a possible stop-string or tag prefix)
    arrives with a later event. When generation ends on an end-of-sequence token while
    text is still held back, one last event with `token_id=None` carries it.
    `logprob` is set only when asked for (prefill_and_generate's top_logprobs): one per generated
    token, whether or not its text was released at this step.
    """

    token_id: int | None
    text: str
    reasoning: str
    content: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The last event: why generation ended, and how fast it went.

    Prefill covers the prompt forward passes and sampling the first token; decode covers
    each later forward pass. Time the consumer spends between events is not counted.
    """

    finish_reason: str  # "stop" (end-of-sequence token or stop string), "length", or "tool_calls" (ended after a call)
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float  # over the prompt tokens actually run (prompt_tokens - cached_tokens)
    decode_tokens_per_s: float
    cached_tokens: int = 0  # prompt tokens whose cache rows were reused (util/prefix_cache.py), not run
