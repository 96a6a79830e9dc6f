"""Prefix reuse of the compressed KV cache across requests (multi-turn chats, shared system prompts).

Chat clients send the whole conversation every turn, so most of a prompt was seen before. The
model's cache holds one sequence per slot, whose token ids the model keeps in `model.slot_ids`
(`model.cached_ids` is slot 0's); this module adds a store of other sequences' cache rows in host RAM:

    cache = PrefixCache(model, capacity_tokens=16384)
    start = cache.prepare(prompt_ids, slot)   # rows 0..start-1 of the slot hold the prompt's first `start` tokens
    ...prefill prompt_ids[start:] from position `start`, then decode...

`prepare` reuses the longest common prefix of the prompt with the slot's sequence, another slot's
(copying its rows over: two users of one long system prompt) or any stored one (copying its rows
in), never more, and always leaves at least one prompt token to
prefill (its logits give the first answer token). Before a request overwrites a slot's rows that
another request could reuse, that sequence is saved to the store. The store keeps whole
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

    `capacity_tokens` bounds the store (0: reuse only the sequences in the model's cache slots);
    `device` is where stored rows live (host RAM by default: plentiful, and a restore costs one copy
    per layer). With several cache slots (batched serving) every slot's sequence is a source too.
    """

    def __init__(self, model, capacity_tokens: int = 16384, device: str | torch.device = "cpu"):
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        self.model, self.capacity_tokens, self.device = model, capacity_tokens, torch.device(device)
        self.stored: list[StoredSequence] = []
        self.slot_used = [0.0] * len(model.slot_ids)

    @property
    def stored_tokens(self) -> int:
        return sum(len(s.ids) for s in self.stored)

    def pick_slot(self, prompt_ids: list[int], free_slots: list[int]) -> int:
        """The free slot whose sequence shares the longest prefix with the prompt (ties: least recently used)."""
        slot_ids = self.model.slot_ids
        return max(free_slots, key=lambda s: (common_prefix(slot_ids[s], prompt_ids), -self.slot_used[s]))

    def prepare(self, prompt_ids: list[int], slot: int = 0) -> int:
        """Make `slot`'s cache hold the longest known prefix of the prompt; return its length."""
        limit = len(prompt_ids) - 1  # the last prompt token is always run: its logits pick the first answer token
        slot_ids = self.model.slot_ids
        live = slot_ids[slot]
        reuse = min(common_prefix(live, prompt_ids), limit)
        # another slot's sequence (running or idle: its first rows never change) or a stored one may share more
        donor = max((s for s in range(len(slot_ids)) if s != slot), default=None,
                    key=lambda s: common_prefix(slot_ids[s], prompt_ids))
        from_slot = 0 if donor is None else min(common_prefix(slot_ids[donor], prompt_ids), limit)
        best = max(self.stored, key=lambda s: common_prefix(s.ids, prompt_ids), default=None)
        from_store = 0 if best is None else min(common_prefix(best.ids, prompt_ids), limit)
        if len(live) > reuse:
            self._save(live, slot)  # this request overwrites the slot's rows from `reuse` on
        if from_slot > max(reuse, from_store):
            for target, source in zip(self.model.kv_caches(slot), self.model.kv_caches(donor)):
                target[:from_slot].copy_(source[:from_slot])
            live[:] = slot_ids[donor][:from_slot]
            reuse = from_slot
        elif from_store > reuse:
            self._restore(best, from_store, slot)
            reuse = from_store
        del live[reuse:]
        self.slot_used[slot] = time.monotonic()
        if reuse:
            source = ("live" if reuse not in (from_slot, from_store) else
                      f"from slot {donor}" if reuse == from_slot else "restored from the store")
            log.debug("prefix cache: %d of %d prompt tokens cached (%s)", reuse, len(prompt_ids), source)
        return reuse

    def _save(self, ids: list[int], slot: int) -> None:
        if self.capacity_tokens < max(len(ids), MIN_STORED_TOKENS) or any(
                common_prefix(s.ids, ids) == len(ids) for s in self.stored):
            return  # too short, too long for the store, or already held within a longer one
        self.stored = [s for s in self.stored if common_prefix(s.ids, ids) < len(s.ids)]  # superseded
        while self.stored and self.stored_tokens + len(ids) > self.capacity_tokens:
            self.stored.remove(min(self.stored, key=lambda s: s.last_used))
        n = len(ids)
        rows = [cache[:n].to(self.device, copy=True) for cache in self.model.kv_caches(slot)]
        self.stored.append(StoredSequence(list(ids), rows))

    def _restore(self, entry: StoredSequence, n: int, slot: int) -> None:
        for cache, rows in zip(self.model.kv_caches(slot), entry.rows):
            cache[:n].copy_(rows[:n], non_blocking=False)
        self.model.slot_ids[slot][:] = entry.ids[:n]
        entry.last_used = time.monotonic()
