"""One worker thread owns the model; requests wait in a bounded queue.

The generation function is injected: `generate_fn(GenerationRequest)` returns an iterator of
events (PromptAccepted first if it likes, then TokenEvent..., then FinishEvent).  The worker
pushes each event into the job's own queue and, after every event, checks whether the job was
cancelled (client gone); if so it closes the iterator, which stops generation within one token.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger("ktransformers.server")


@dataclass
class GenerationRequest:
    """What the model must do; `messages` for chat, `prompt` for raw completions."""

    max_new_tokens: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    force_think: bool = False
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

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self.finished = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def _put(self, item: Any) -> None:
        self._events.put(item)

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
    def __init__(self, generate_fn: GenerateFn, queue_size: int = 8):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._generate = generate_fn
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self.current: Job | None = None
        self.completed = 0
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="ktransformers-engine", daemon=True)
        self._worker.start()

    @property
    def busy(self) -> bool:
        return self.current is not None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest) -> Job:
        if self._stopped:
            raise EngineStopped("the engine is shut down")
        job = Job(request)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue_size} requests are already waiting") from None
        return job

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running job's current token, drop the waiting ones, end the worker."""
        self._stopped = True
        if self.current is not None:
            self.current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job._put(EngineStopped("the engine is shut down"))
            job._put(_END)
        self._queue.put(None)
        self._worker.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                job._put(_END)
                job.finished.set()
                continue
            self.current = job
            try:
                self._serve(job)
            finally:
                self.current = None
                self.completed += 1
                job._put(_END)
                job.finished.set()

    def _serve(self, job: Job) -> None:
        events = None
        try:
            events = iter(self._generate(job.request))
            for event in events:
                if job.cancelled:
                    log.info("request %s cancelled (client gone); generation stopped", job.request.request_id)
                    break
                job._put(event)
                if is_finish(event):
                    break
        except Exception as exc:  # handed to the request thread, which turns it into an HTTP error
            job._put(exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing the generator of request %s failed", job.request.request_id)
