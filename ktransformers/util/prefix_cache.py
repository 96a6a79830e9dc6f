"""Prefix reuse of the compressed KV cache across requests (multi-turn chats, shared system prompts).

Chat clients send the whole conversation every turn, so most of a prompt was seen before. The
model's cache holds one sequence, whose token ids the model keeps in `model.cached_ids`; this
module adds a store of other sequences' cache rows in host RAM:

    cache = PrefixCache(model, capacity_tokens=16384)
    start = cache.prepare(prompt_ids)   # rows 0..start-1 now hold the prompt's first `start` tokens
    ...prefill prompt_ids[start:] from position `start`, then decode...

`prepare` reuses the longest common prefix of the prompt with the live sequence or with any stored
one (copying that one's rows in), never more, and always leaves at least one prompt token to
prefill (its logits give the first answer token). Before a request overwrites live rows that
another request could reuse, the live sequence is saved to the store. The store keeps whole
sequences, least recently used evicted first, at most `capacity_tokens` rows in all. R1's chat
template drops earlier reasoning from the history, so turn N+1 shares turn N's prompt and answer
only up to where the reasoning began: matching on token ids handles that by itself.

Rows are exact copies, so results equal a cold run's up to the float differences of chunking the
prefill at another boundary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# Sequences shorter than this are not worth a copy into the store.
MIN_STORED_TOKENS = 16


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class StoredSequence:
    ids: list[int]
    rows: list[torch.Tensor]  # per layer [len(ids), width], on the store's device
    last_used: float = field(default_factory=time.monotonic)


class PrefixCache:
    """Finds and restores the longest cached prefix of a prompt; see the module docstring.

    `capacity_tokens` bounds the store (0: reuse only the live sequence); `device` is where stored
    rows live (host RAM by default: plentiful, and a restore costs one copy per layer).
    """

    def __init__(self, model, capacity_tokens: int = 16384, device: str | torch.device = "cpu"):
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.model, self.capacity_tokens, self.device = model, capacity_tokens, torch.device(device)
        self.stored: list[StoredSequence] = []

    @property
    def stored_tokens(self) -> int:
        return sum(len(s.ids) for s in self.stored)

    def prepare(self, prompt_ids: list[int]) -> int:
        """Make the model's cache hold the longest known prefix of the prompt; return its length."""
        limit = len(prompt_ids) - 1  # the last prompt token is always run: its logits pick the first answer token
        live = self.model.cached_ids
        reuse = min(common_prefix(live, prompt_ids), limit)
        best = max(self.stored, key=lambda s: common_prefix(s.ids, prompt_ids), default=None)
        from_store = 0 if best is None else min(common_prefix(best.ids, prompt_ids), limit)
        if len(live) > reuse:
            self._save(live)  # this request overwrites live rows from `reuse` on
        if from_store > reuse:
            self._restore(best, from_store)
            reuse = from_store
        del self.model.cached_ids[reuse:]
        if reuse:
            log.debug("prefix cache: %d of %d prompt tokens cached (%s)", reuse, len(prompt_ids),
                      "restored from the store" if reuse == from_store and from_store else "live")
        return reuse

    def _save(self, ids: list[int]) -> None:
        if self.capacity_tokens < max(len(ids), MIN_STORED_TOKENS) or any(
                common_prefix(s.ids, ids) == len(ids) for s in self.stored):
            return  # too short, too long for the store, or already held within a longer one
        self.stored = [s for s in self.stored if common_prefix(s.ids, ids) < len(s.ids)]  # superseded
        while self.stored and self.stored_tokens + len(ids) > self.capacity_tokens:
            self.stored.remove(min(self.stored, key=lambda s: s.last_used))
        n = len(ids)
        rows = [cache[:n].to(self.device, copy=True) for cache in self.model.kv_caches()]
        self.stored.append(StoredSequence(list(ids), rows))

    def _restore(self, entry: StoredSequence, n: int) -> None:
        for cache, rows in zip(self.model.kv_caches(), entry.rows):
            cache[:n].copy_(rows[:n], non_blocking=False)
        self.model.cached_ids[:] = entry.ids[:n]
        entry.last_used = time.monotonic()
