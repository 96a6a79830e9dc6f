"""One worker thread owns the model and runs up to max_batch requests at once (server/scheduler.py);
the others wait in a bounded list (a client that leaves while waiting gives its place back at once).

The generation function is injected: `generate_fn(GenerationRequest)` returns an iterator of
events (PromptAccepted first if it likes, then TokenEvent..., then FinishEvent).  The worker
pushes each event into the job's own queue and, after every event, checks whether the job was
cancelled (client gone); if so it closes the iterator, which stops generation within one token.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ktransformers.server.scheduler import Scheduler

log = logging.getLogger("ktransformers.server")


@dataclass
class GenerationRequest:
    """What the model must do; `messages` for chat, `prompt` for raw completions."""

    max_new_tokens: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None   # set by the generate function's prepare(), if it has one
    slot: int = 0                         # the cache slot the scheduler gave the running request
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    force_think: bool = False
    top_logprobs: int | None = None       # None: no log-probabilities; n: each token's and n alternatives
    output_rules: Any = None    # util.structured.OutputRules: tools, tool_choice, a JSON schema
    output_plan: Any = None     # set by prepare(): their compiled grammars
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class PromptAccepted:
    """Optional first event: the prompt fits and generation starts (lets headers go out before prefill)."""

    prompt_tokens: int


GenerateFn = Callable[[GenerationRequest], Iterator[Any]]


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


def is_finish(event: Any) -> bool:
    return getattr(event, "finish_reason", None) is not None


_END = object()   # the worker is done with a job
PING = object()   # yielded by Job.events while the model is silent


class Job:
    """One request's view of the engine: a private event queue plus a cancel flag."""

    def __init__(self, request: GenerationRequest, on_cancel: Callable[["Job"], None] | None = None):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self.interrupted: BaseException | None = None   # set by Engine.stop: reported to the client
        self.finished = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client is gone: stop generating, or give up the queue slot at once if still waiting."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def _interrupt(self, reason: BaseException) -> None:
        self.interrupted = reason
        self._cancelled.set()

    def _put(self, item: Any) -> None:
        self._events.put(item)

    def _end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._put(error)
        self._put(_END)
        self.finished.set()

    def events(self, poll_s: float = 0.25, ping_s: float | None = None,
               disconnected: Callable[[], bool] | None = None) -> Iterator[Any]:
        """Yield events as they come; raise the worker's exception; yield PING every `ping_s` of silence.

        `disconnected` is polled while waiting so a vanished client cancels even a silent job.
        """
        silent_s = 0.0
        while True:
            if disconnected is not None and disconnected():   # cheap: a flag the server keeps
                self.cancel()
                return
            try:
                item = self._events.get(timeout=poll_s)
            except queue.Empty:
                silent_s += poll_s
                if ping_s is not None and silent_s >= ping_s:
                    silent_s = 0.0
                    yield PING
                continue
            silent_s = 0.0
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine:
    """The model's one worker thread and the bounded list of jobs waiting for it.

    Up to `max_batch` jobs run at once (server/scheduler.py: chunked prefill between batched decode
    steps, `prefill_slice` prompt tokens a step while others decode); the rest wait. `generate_fn`
    may have a `prepare(request)` method: it runs on the caller's (request) thread in `prepare`,
    before the job queues, so tokenizing and context checks never hold up the model.
    """

    def __init__(self, generate_fn: GenerateFn, queue_size: int = 8, max_batch: int = 1,
                 prefill_slice: int | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._generate = generate_fn
        self._prepare = getattr(generate_fn, "prepare", None)
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self.queue_size, self.max_batch = queue_size, max_batch
        self._scheduler = Scheduler(generate_fn, max_batch, self._ended, prefill_slice)
        self.completed = 0
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="ktransformers-engine", daemon=True)
        self._worker.start()

    @property
    def running(self) -> list[Job]:
        return self._scheduler.jobs

    @property
    def decode_batch_sizes(self) -> collections.Counter:
        """How many decode passes ran with each number of sequences."""
        return self._scheduler.decode_batch_sizes

    @property
    def busy(self) -> bool:
        return bool(self._scheduler.active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def stopping(self) -> bool:
        return self._stopped

    def prepare(self, request: GenerationRequest) -> None:
        """Tokenize and check the request on the calling thread (the generate function's `prepare`)."""
        if self._prepare is not None:
            self._prepare(request)

    def submit(self, request: GenerationRequest) -> Job:
        with self._lock:
            if self._stopped:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{self.queue_size} requests are already waiting")
            job = Job(request, on_cancel=self._withdraw)
            self._waiting.append(job)
            self._lock.notify()
        return job

    def _withdraw(self, job: Job) -> None:
        """A waiting job whose client left gives its slot back now, not when the worker reaches it."""
        with self._lock:
            try:
                self._waiting.remove(job)
            except ValueError:
                return   # running or done: the worker handles it
        job._end()

    def stop(self, grace_s: float = 0.0, timeout: float = 5.0) -> None:
        """Admit nothing more, refuse the waiting jobs, give the running ones `grace_s` seconds to
        finish, then interrupt them (their clients are told the server is shutting down); end the worker."""
        with self._lock:
            self._stopped = True
            refused, self._waiting = list(self._waiting), collections.deque()
            self._lock.notify_all()
        for job in refused:
            job._end(EngineStopped("the server is shutting down"))
        deadline = time.monotonic() + grace_s   # one grace for all: the running jobs finish side by side
        for job in self.running:
            job.finished.wait(max(0.0, deadline - time.monotonic()))
        for job in self.running:
            if not job.finished.is_set():
                reason = EngineStopped("the server is shutting down; generation was stopped")
                job._interrupt(reason)
                job._put(reason)    # the client hears it now, even while the model is inside a step
        self._worker.join(timeout)

    def _run(self) -> None:
        scheduler = self._scheduler
        while True:
            with self._lock:
                while not self._waiting and not scheduler.active and not self._stopped:
                    self._lock.wait()
                if not self._waiting and not scheduler.active:
                    return
                admitted = []
                while self._waiting and scheduler.has_room():
                    admitted.append(self._waiting.popleft())
            for job in admitted:
                scheduler.admit(job)
            scheduler.round()

    def _ended(self, job: Job, error: BaseException | None) -> None:
        self.completed += 1
        job._end(error)
