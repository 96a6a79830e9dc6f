"""From a validated request to a running engine job whose first event is known.

Routes call `start_job` before they commit a status code, so a prompt that does not fit,
bad sampling values or a full queue still become proper HTTP errors.  The returned
RunningJob iterates the remaining events, cancels the job when closed (client gone) and
writes the one log line per request.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

from flask import current_app, request
from jinja2 import TemplateError

from ktransformers.server.engine import (PING, Engine, EngineStopped, GenerationRequest,
                                         PromptAccepted, QueueFull, is_finish)
from ktransformers.server.errors import APIError
from ktransformers.server.metrics import RECEIVED_AT
from ktransformers.server.settings import ServerSettings
from ktransformers.server.tool_call_replies import is_tool_call
from ktransformers.util.events import ContextLengthError
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.structured import FieldError

log = logging.getLogger("ktransformers.server")


def generation_error(exc: BaseException) -> APIError:
    """Map what the worker raised to an HTTP error.

    Requests are validated before they queue (schemas, sampling values, `prepare`), so anything
    raised while generating is the server's fault: 500 (503 when the server is shutting down).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), error_type="server_error", code="server_shutting_down")
    log.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", error_type="server_error")


def check_sampling(sampling: dict[str, Any]) -> None:
    """Reject bad sampling values now, with the field's name, rather than inside the worker."""
    try:
        SamplingParams(**sampling)
    except ValueError as exc:
        name = str(exc).split("=", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(exc), param=name, code="invalid_value") from None


def queue_full(exc: QueueFull, settings: ServerSettings) -> APIError:
    return APIError(503, f"Server busy: {exc}; retry later", error_type="server_overloaded",
                    code="queue_full", headers={"Retry-After": str(settings.retry_after_s)})


def prompt_chars(gen: GenerationRequest) -> int:
    if gen.messages is not None:   # tool calls in the history and tool definitions count too
        tools = gen.output_rules.tools if gen.output_rules is not None else None
        calls = [m["tool_calls"] for m in gen.messages if m.get("tool_calls")]
        return (sum(len(m["content"] or "") for m in gen.messages)
                + sum(len(json.dumps(c)) for c in calls) + (len(json.dumps(tools)) if tools else 0))
    return len(gen.prompt or "")


def check_prompt_size(gen: GenerationRequest, settings: ServerSettings) -> None:
    """Refuse, before any tokenizing, a prompt with more characters than max_context tokens can hold."""
    chars = prompt_chars(gen)
    if chars > settings.max_prompt_chars:
        raise APIError(400, f"The prompt has {chars} characters; at most {settings.max_token_chars} fit in one "
                            f"token, so it cannot fit the {settings.max_context}-token context (limit: "
                            f"{settings.max_prompt_chars} characters)",
                       param="messages" if gen.messages is not None else "prompt", code="context_length_exceeded")


def prepare(engine: Engine, gen: GenerationRequest) -> None:
    """Tokenize and check the prompt on this (request) thread; its errors are the client's."""
    try:
        engine.prepare(gen)
    except ContextLengthError as exc:
        raise generation_error(exc) from None
    except FieldError as exc:   # e.g. tools for a template that cannot render calls, a schema the grammar refuses
        raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
    except (ValueError, TemplateError) as exc:   # e.g. the chat template refuses this conversation
        raise APIError(400, str(exc), code="invalid_value") from None


class RunningJob:
    def __init__(self, engine: Engine, gen: GenerationRequest, settings: ServerSettings, ping: bool):
        self.gen = gen
        self.started = time.monotonic()
        self.received_at = request.environ.get(RECEIVED_AT, self.started)
        self.first_token_at: float | None = None
        self._metrics = current_app.config.get("KT_METRICS")   # server.metrics.ServerMetrics
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0
        self.logprobs = []          # TokenLogprob of each generated token, when the request asked
        self.finish = None
        self._route = f"{request.method} {request.path}"
        try:
            self._job = engine.submit(gen)
        except QueueFull as exc:
            raise queue_full(exc, settings) from None
        except EngineStopped as exc:
            raise generation_error(exc) from None
        self._events = self._job.events(ping_s=settings.stream_ping_s if ping else None,
                                        disconnected=request.environ.get("waitress.client_disconnected"))
        self._first = None
        try:
            self._first = self._next_real_event()
        except Exception as exc:
            error = generation_error(exc)
            self.close(outcome=f"error {error.status}: {error.message}")
            raise error from None
        if self._first is None:
            self.close()
            raise APIError(503, "the request was cancelled before generation started", error_type="server_error")

    def _next_real_event(self):
        for event in self._events:
            if isinstance(event, PromptAccepted):
                self.prompt_tokens = event.prompt_tokens
                return event
            if event is not PING:
                return event
        return None

    def __iter__(self) -> Iterator[Any]:
        """Yield TokenEvent, FinishEvent and PING (a chance to keep an idle stream alive)."""
        if not isinstance(self._first, PromptAccepted):
            yield self._account(self._first)
        for event in self._events:
            if not isinstance(event, PromptAccepted):
                yield self._account(event)

    def _account(self, event):
        if is_finish(event):
            self.finish = event
            self.prompt_tokens = event.prompt_tokens
        elif event is not PING and getattr(event, "token_id", None) is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if getattr(event, "logprob", None) is not None:
                self.logprobs.append(event.logprob)
        return event

    def close(self, outcome: str = "cancelled") -> None:
        """Cancel the job if it still runs (the client left) and log the request once."""
        if self._job is None:
            return
        self._job.cancel()
        self._job = None
        self._events.close()
        wall = time.monotonic() - self.started
        if self._metrics is not None:
            self._metrics.generation_done(self)
        f = self.finish
        if f is not None:
            log.info("%s id=%s prompt_tokens=%d completion_tokens=%d prefill=%.3fs (%.1f tok/s) "
                     "decode=%.3fs (%.2f tok/s) total=%.3fs finish=%s", self._route, self.gen.request_id,
                     f.prompt_tokens, f.completion_tokens, f.prefill_seconds, f.prefill_tokens_per_s,
                     f.decode_seconds, f.decode_tokens_per_s, wall, f.finish_reason)
        else:
            log.info("%s id=%s prompt_tokens=%s completion_tokens=%d total=%.3fs finish=%s", self._route,
                     self.gen.request_id, self.prompt_tokens, self.completion_tokens, wall, outcome)


def start_job(engine: Engine, gen: GenerationRequest, settings: ServerSettings, ping: bool = False) -> RunningJob:
    check_sampling(gen.sampling)
    check_prompt_size(gen, settings)
    if engine.stopping:
        raise generation_error(EngineStopped("the server is shutting down"))
    if engine.waiting >= engine.queue_size:   # no tokenizing for a request that cannot queue anyway
        raise queue_full(QueueFull(f"{engine.queue_size} requests are already waiting"), settings)
    prepare(engine, gen)
    return RunningJob(engine, gen, settings, ping)


def collect(run: RunningJob, formatter=None, tool_calls=None) -> tuple[str, str, Any]:
    """Run a non-streaming job to the end: (reasoning, content, FinishEvent).

    Without a formatter the raw text (tags included) is returned as content. Tool-call events go
    to `tool_calls` (a server.tool_call_replies.ToolCalls).
    """
    reasoning, content = [], []
    try:
        for event in run:
            if event is PING:
                continue
            if is_tool_call(event):
                if tool_calls is not None:
                    tool_calls.add(event)
                continue
            if formatter is None:
                r, c = ("", "") if is_finish(event) else ("", event.text)
            elif is_finish(event):
                r, c = formatter.finish()
            else:
                r, c = formatter.feed(event.reasoning, event.content)
            reasoning.append(r)
            content.append(c)
    except Exception as exc:
        raise generation_error(exc) from None
    finally:
        run.close()
    if run.finish is None:
        raise APIError(503, "generation was cancelled", error_type="server_error")
    return "".join(reasoning), "".join(content), run.finish
