"""Constrained decoding: a grammar decides which tokens may come next (llguidance).

`prefill_and_generate(..., constraint=c)` calls `c.mask(logits)` before each token is sampled and
`c.accept(token)` after; everything here implements that pair:

- `GrammarConstraint`: the whole answer follows a grammar (JSON schema, forced tool calls);
- `TriggeredConstraint`: free text until the model emits a trigger token (the tool-calls-begin
  marker), then a grammar for the rest, so a call the model starts on its own always parses;
- `BannedTokens`: tokens that may never come (tool_choice "none" bans the calls marker).

Why llguidance: benchmarks/constrained_decoding.py times it against xgrammar (xgrammar computes a
mask 2-3x faster, both well under 1 % of a DeepSeek-V3 step), but xgrammar 0.2.9 lets control
characters into strings that carry maxLength, so its "valid" JSON failed json.loads in 18 of 40
random walks (tests/test_constrained.py walks the same way); llguidance builds a grammar in a few
ms where xgrammar takes 10-250 ms, and needs no triton. The answer must always parse.
"""

from __future__ import annotations

import math
import re

import llguidance
import llguidance.hf
import numpy as np
import torch


class GrammarError(ValueError):
    """The grammar library cannot compile what the request asked for."""


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [vocab] from a packed int32 bitmask (bit j of word i: token 32 * i + j may come next)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.view(np.bool_))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` [vocab] with every token the bitmask forbids at -inf."""
    allowed = allowed_tokens(bitmask, logits.shape[-1]).to(logits.device, non_blocking=True)
    return logits.masked_fill(~allowed, -math.inf)


class Grammars:
    """Builds matchers for one tokenizer and lm_head width (the end-of-sequence ids end a grammar)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))

    def matcher(self, lark: str) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `lark` (GrammarError when llguidance refuses the grammar)."""
        matcher = llguidance.LLMatcher(self._tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        return matcher


def _reason(error: str) -> str:
    """llguidance's message on one line, without its position prefix and its listing of the grammar."""
    text = re.sub(r"^at \d+\(\d+\):\s*", "", error.strip()).split("\n   1 |")[0]
    return " ".join(text.split())


class GrammarConstraint:
    """Every token from now on must continue the matcher's grammar; end-of-sequence only once it is complete."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        if self._matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {self._matcher.get_error()}")
        return apply_bitmask(logits, self._bitmask)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} breaks the grammar it was sampled under: {self._matcher.get_error()}")


class TriggeredConstraint:
    """No constraint until `trigger` is accepted; from the next token on, the matcher's grammar rules."""

    def __init__(self, trigger: int, matcher: llguidance.LLMatcher, vocab_size: int):
        self.trigger, self._waiting = trigger, GrammarConstraint(matcher, vocab_size)
        self.active: GrammarConstraint | None = None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.active is None else self.active.mask(logits)

    def accept(self, token: int) -> None:
        if self.active is not None:
            self.active.accept(token)
        elif token == self.trigger:
            self.active = self._waiting


class BannedTokens:
    def __init__(self, token_ids):
        self._ids = torch.tensor(sorted(token_ids), dtype=torch.long)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(0, self._ids.to(logits.device), -math.inf)

    def accept(self, token: int) -> None:
        pass
