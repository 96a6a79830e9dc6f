"""Constrained decoding: a grammar decides which tokens may come next (xgrammar).

`prefill_and_generate(..., constraint=c)` calls `c.mask(logits)` before each token is sampled and
`c.accept(token)` after; everything here implements that pair:

- `GrammarConstraint`: the whole answer follows a compiled grammar (JSON schema, forced tool calls);
- `TriggeredConstraint`: free text until the model emits a trigger token (the tool-calls-begin
  marker), then a grammar for the rest, so a call the model starts on its own always parses;
- `BannedTokens`: tokens that may never come (tool_choice "none" bans the calls marker).

xgrammar was chosen over llguidance by measured per-token cost (benchmarks/constrained_decoding.py).
`Grammars` compiles for one tokenizer and keeps a cache, so a client that sends the same tools or
schema every turn compiles them once.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import xgrammar


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
    """Compiles structural tags (util/grammar.py) for one tokenizer and lm_head width."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(eos_ids))
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)

    def compile(self, structural_tag) -> xgrammar.CompiledGrammar:
        try:
            return self._compiler.compile_structural_tag(structural_tag)
        except (RuntimeError, ValueError) as exc:   # xgrammar reports unsupported schemas this way
            raise GrammarError(library_reason(exc)) from None


def library_reason(exc: Exception) -> str:
    """xgrammar's message without its "[time] source.cc:line:" prefix."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0])


class GrammarConstraint:
    """Every token from now on must continue `compiled`; the end-of-sequence token only once it is complete."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int):
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self._matcher.fill_next_token_bitmask(self._bitmask.view(1, -1))
        return apply_bitmask(logits, self._bitmask)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the grammar it was sampled under")


class TriggeredConstraint:
    """No constraint until `trigger` is accepted; from the next token on, `compiled` rules."""

    def __init__(self, trigger: int, compiled: xgrammar.CompiledGrammar, vocab_size: int):
        self.trigger, self._compiled, self._vocab_size = trigger, compiled, vocab_size
        self.active: GrammarConstraint | None = None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.active is None else self.active.mask(logits)

    def accept(self, token: int) -> None:
        if self.active is not None:
            self.active.accept(token)
        elif token == self.trigger:
            self.active = GrammarConstraint(self._compiled, self._vocab_size)


class BannedTokens:
    def __init__(self, token_ids):
        self._ids = torch.tensor(sorted(token_ids), dtype=torch.long)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(0, self._ids.to(logits.device), -math.inf)

    def accept(self, token: int) -> None:
        pass
