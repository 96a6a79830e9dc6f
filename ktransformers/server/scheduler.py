"""The engine worker's scheduler: up to `max_batch` jobs generate at once.

Each job's generate function yields events and, for a real model, util.sequence.Forward requests
(the model passes its sequence needs). One scheduler round:

    1. drop the jobs whose client left (their slot is free at once);
    2. run one prefill chunk of the oldest job still prefilling (`run_prefill`);
    3. run one decode step of every job waiting to decode, as one batched pass (`run_decode`);

then runs each job on to its next request (its logits ride on its Forward), pushing its events. So a new
request's prefill goes in chunks between the running streams' decode steps, and a decode step costs
one pass over the weights however many streams take part. While other streams decode, a prefill chunk
runs `prefill_slice` tokens a round (a model's chunk may be 512 or 4096 tokens, seconds to tens of
seconds of a large model; the running streams would get no token for that long); alone, it runs whole.
Each job owns a cache slot (0..max_batch-1) for as long as it runs; `generate_fn.pick_slot(request,
free_slots)` may choose which (prefix reuse).
Generate functions that never ask for a pass (test stand-ins) are run until their next event.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Iterator

from ktransformers.util.sequence import Forward, run_decode, run_prefill

log = logging.getLogger("ktransformers.server")

# Prompt tokens a round while other streams decode (chat_openai.py --prefill_slice). DeepSeek routes
# 128 tokens x top-8 to most of a layer's 256 experts, so a 128-token pass reads nearly every expert,
# as a 512-token one does, and a CPU pass of that size is about as fast per token as a whole chunk;
# the running streams wait a quarter as long between their tokens.
DEFAULT_PREFILL_SLICE = 128


@dataclass
class Active:
    """A running job: its step iterator, its cache slot, and the pass it waits for (None: none)."""

    job: Any
    steps: Iterator[Any]
    slot: int
    pending: Forward | None = None
    done: bool = False
    prefilled: int = 0  # tokens of a pending prefill chunk already run (sliced between decode steps)


class Scheduler:
    """`on_end(job, error)` is called as soon as a job ends (error None: finished or cancelled cleanly).
    `prefill_slice`: prompt tokens a round while other streams decode (None: whole chunks always)."""

    def __init__(self, generate_fn, max_batch: int, on_end, prefill_slice: int | None = None):
        if prefill_slice is not None and prefill_slice < 1:
            raise ValueError(f"prefill_slice must be >= 1 (or None), got {prefill_slice}")
        self.generate_fn, self.max_batch, self.on_end = generate_fn, max_batch, on_end
        self.prefill_slice = prefill_slice
        self.active: list[Active] = []
        self.decode_batch_sizes: collections.Counter[int] = collections.Counter()  # sequences per decode pass

    @property
    def jobs(self) -> list[Any]:
        return [a.job for a in self.active]

    def has_room(self) -> bool:
        return len(self.active) < self.max_batch

    def admit(self, job) -> None:
        """Start a job in a free slot and run it up to its first model pass."""
        free = sorted(set(range(self.max_batch)) - {a.slot for a in self.active})
        pick = getattr(self.generate_fn, "pick_slot", None)
        slot = pick(job.request, free) if pick is not None else free[0]
        job.request.slot = slot
        active = Active(job, iter(()), slot)
        self.active.append(active)
        try:
            active.steps = iter(self.generate_fn(job.request))
        except Exception as exc:  # handed to the request thread, which turns it into an HTTP error
            self._finish(active, exc)
            return
        self._advance(active)

    def round(self) -> None:
        """One scheduling round (see the module docstring)."""
        for a in list(self.active):
            if a.job.cancelled:
                self._cancelled(a)
        prefill = next((a for a in self.active if a.pending is not None and a.pending.prefill), None)
        if prefill is not None:
            self._prefill(prefill)
        # a job whose prefill just ended decodes its first token in this same pass
        decoding = [a for a in self.active if a.pending is not None and not a.pending.prefill]
        if decoding:
            self.decode_batch_sizes[len(decoding)] += 1
            self._pass(run_decode, [a.pending for a in decoding], decoding)

    def _prefill(self, a: Active) -> None:
        """Run a's prefill chunk, or its next slice while other streams are decoding."""
        chunk, start = a.pending, a.prefilled
        end = len(chunk.ids)
        if self.prefill_slice is not None and any(
                b is not a and b.pending is not None and not b.pending.prefill for b in self.active):
            end = min(end, start + self.prefill_slice)
        if start == 0 and end == len(chunk.ids):  # the whole chunk at once
            self._pass(run_prefill, chunk, [a])
            return
        part = Forward(chunk.model, chunk.ids[start:end], chunk.start_pos + start, chunk.slot, prefill=True)
        log.debug("request %s: prefill tokens %d-%d of a %d-token chunk", a.job.request.request_id, start, end,
                  len(chunk.ids))
        if not self._run_or_fail(run_prefill, part, [a]):
            return
        a.prefilled = end
        if end == len(chunk.ids):  # the chunk's last slice: its logits are the chunk's
            chunk.logits, a.prefilled, a.pending = part.logits, 0, None
            self._advance(a)

    def _pass(self, run, forwards, members: list[Active]) -> None:
        if not self._run_or_fail(run, forwards, members):
            return
        for a in members:
            a.pending = None
            self._advance(a)

    def _run_or_fail(self, run, forwards, members: list[Active]) -> bool:
        try:
            run(forwards)
            return True
        except Exception as exc:  # every job of a failed pass fails with it
            for a in members:
                self._finish(a, exc)
            return False

    def _advance(self, a: Active) -> None:
        """Run a's steps on (its pass's logits are on the Forward) until it asks for a pass or ends."""
        try:
            item = next(a.steps)
            while not isinstance(item, Forward):
                if a.job.cancelled:
                    self._cancelled(a)
                    return
                a.job._put(item)
                if getattr(item, "finish_reason", None) is not None:
                    self._finish(a)
                    return
                item = next(a.steps)
            a.pending = item
        except StopIteration:
            self._finish(a)
        except Exception as exc:  # handed to the request thread, which turns it into an HTTP error
            self._finish(a, exc)

    def _cancelled(self, a: Active) -> None:
        log.info("request %s %s; generation stopped", a.job.request.request_id,
                 "interrupted (shutdown)" if a.job.interrupted else "cancelled (client gone)")
        self._finish(a, a.job.interrupted)

    def _finish(self, a: Active, error: BaseException | None = None) -> None:
        """End a job now: close its steps, free its slot, tell the engine."""
        if a.done:
            return
        a.done, a.pending = True, None
        self.active.remove(a)
        close = getattr(a.steps, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("closing the generator of request %s failed", a.job.request.request_id)
        self.on_end(a.job, error)
