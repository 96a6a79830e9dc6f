"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Completions accept any model name and answer as the served model (`model` in the response);
only /v1/models/<id> tells a wrong name apart, with 404.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from ktransformers.server.engine import PING, GenerationRequest, is_finish
from ktransformers.server.errors import APIError, unknown_model
from ktransformers.server.jobs import RunningJob, collect, generation_error, start_job
from ktransformers.server.logprobs import PendingLogprobs, chat_logprobs, completion_logprobs
from ktransformers.server.output_rules import history_message, openai_output_rules
from ktransformers.server.reasoning_format import ReasoningFormatter
from ktransformers.server.schemas import ChatCompletionRequest, CompletionRequest, ContentPart
from ktransformers.server.sse import SSE_DONE, SSE_PING, sse_event, sse_response
from ktransformers.server.timings import llama_timings
from ktransformers.server.tool_call_replies import ToolCalls, is_tool_call, openai_delta

openai_routes = Blueprint("openai", __name__)


def _engine_settings():
    return current_app.config["KT_ENGINE"], current_app.config["KT_SETTINGS"]


def _check_common(body) -> None:
    # body.model is not checked: chat clients send whatever name the user typed; the served
    # model answers and every response names it.
    if body.n not in (None, 1):
        raise APIError(400, f"n={body.n} is not supported: this server returns exactly one choice (n=1)",
                       param="n", code="unsupported_value")


def _sampling(body) -> dict:
    values = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
              "seed": body.seed,
              "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
              "repetition_penalty": body.repetition_penalty}
    return {k: v for k, v in values.items() if v is not None}


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def message_text(content: str | list[ContentPart] | None, where: str) -> str:
    """A message's text: a string, or the text parts of a content array joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{where}.content[{i}]: only text parts are supported, got type {part.type!r}",
                           param=f"{where}.content", code="unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def _usage(finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


# ---------------------------------------------------------------- chat

@openai_routes.post("/v1/chat/completions")
def chat_completions():
    engine, settings = _engine_settings()
    body = ChatCompletionRequest.model_validate_json(request.get_data())
    _check_common(body)
    messages = [history_message(m, message_text(m.content, f"messages[{i}]")) for i, m in enumerate(body.messages)]
    gen = GenerationRequest(
        max_new_tokens=settings.reply_limit(body.max_completion_tokens or body.max_tokens),
        messages=messages, sampling=_sampling(body), stop=_stop_list(body.stop),
        force_think=settings.force_think, top_logprobs=body.wanted_logprobs, output_rules=openai_output_rules(body))
    formatter = ReasoningFormatter(body.reasoning_format or settings.reasoning_format)
    run = start_job(engine, gen, settings, ping=body.stream)
    head = {"id": f"chatcmpl-{gen.request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": settings.model_name}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    wanted = gen.top_logprobs is not None
    if body.stream:
        return sse_response(_chat_chunks(run, head, formatter, include_usage, PendingLogprobs(wanted)), run.close)
    tool_calls = ToolCalls()
    reasoning, content, finish = collect(run, formatter, tool_calls)
    message = {"role": "assistant", "content": content}
    if tool_calls:   # as OpenAI: no text besides the calls is null content
        message.update(content=content if content.strip() else None, tool_calls=tool_calls.openai())
    if formatter.separate:
        message["reasoning_content"] = reasoning
    logprobs = chat_logprobs(run.logprobs) if wanted else None
    return jsonify({**head, "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                                 "finish_reason": finish.finish_reason}],
                    "usage": _usage(finish), "timings": llama_timings(finish)})


def _chat_chunks(run: RunningJob, head: dict, formatter: ReasoningFormatter, include_usage: bool,
                 pending: PendingLogprobs):
    head = {**head, "object": "chat.completion.chunk"}
    usage_field = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        entries = pending.take()
        return sse_event({**head, **usage_field, "choices": [
            {"index": 0, "delta": delta, "logprobs": chat_logprobs(entries) if entries else None,
             "finish_reason": finish_reason}], **extra})

    def delta_of(reasoning: str, content: str) -> dict:
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return delta

    try:
        yield chunk({"role": "assistant", "content": ""})
        for event in run:
            if event is PING:
                yield SSE_PING
            elif is_tool_call(event):
                delta = openai_delta(event)
                if delta:
                    yield chunk(delta)
            elif is_finish(event):
                tail = delta_of(*formatter.finish())
                if tail:
                    yield chunk(tail)
                yield chunk({}, event.finish_reason, timings=llama_timings(event))
                if include_usage:
                    yield sse_event({**head, "choices": [],
                                     "usage": _usage(event)})
            else:
                pending.add(event)
                delta = delta_of(*formatter.feed(event.reasoning, event.content))
                if delta:
                    yield chunk(delta)
    except Exception as exc:  # headers are gone: report in-band, as OpenAI does
        yield sse_event(generation_error(exc).openai_body())
    yield SSE_DONE


# ---------------------------------------------------------------- legacy completions

@openai_routes.post("/v1/completions")
def completions():
    engine, settings = _engine_settings()
    body = CompletionRequest.model_validate_json(request.get_data())
    _check_common(body)
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise APIError(400, f"prompt: a list must hold exactly one string (got {len(body.prompt)}); "
                                "batched prompts are not supported", param="prompt", code="unsupported_value")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    gen = GenerationRequest(max_new_tokens=settings.reply_limit(body.max_tokens), prompt=prompt,
                            sampling=_sampling(body), stop=_stop_list(body.stop), top_logprobs=body.logprobs)
    run = start_job(engine, gen, settings, ping=body.stream)
    head = {"id": f"cmpl-{gen.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": settings.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_completion_chunks(run, head, include_usage, PendingLogprobs(body.logprobs is not None)),
                            run.close)
    _, text, finish = collect(run)
    logprobs = completion_logprobs(run.logprobs) if body.logprobs is not None else None
    return jsonify({**head, "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                                         "finish_reason": finish.finish_reason}],
                    "usage": _usage(finish), "timings": llama_timings(finish)})


def _completion_chunks(run: RunningJob, head: dict, include_usage: bool, pending: PendingLogprobs):
    sent_chars = 0

    def chunk(text: str, finish_reason=None, **extra) -> str:
        nonlocal sent_chars
        entries = pending.take()
        logprobs = completion_logprobs(entries, sent_chars) if entries else None
        sent_chars += len(text)
        return sse_event({**head, "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                                               "finish_reason": finish_reason}], **extra})

    try:
        for event in run:
            if event is PING:
                yield SSE_PING
            elif is_finish(event):
                yield chunk("", event.finish_reason, timings=llama_timings(event))
                if include_usage:
                    yield sse_event({**head, "choices": [], "usage": _usage(event)})
            else:
                pending.add(event)
                if event.text:
                    yield chunk(event.text)
    except Exception as exc:
        yield sse_event(generation_error(exc).openai_body())
    yield SSE_DONE


# ---------------------------------------------------------------- models

def _model_card(settings) -> dict:
    return {"id": settings.model_name, "object": "model", "created": settings.created,
            "owned_by": "ktransformers", "max_model_len": settings.max_context}


@openai_routes.get("/v1/models")
def list_models():
    _, settings = _engine_settings()
    return jsonify({"object": "list", "data": [_model_card(settings)]})


@openai_routes.get("/v1/models/<path:model_id>")
def get_model(model_id: str):
    _, settings = _engine_settings()
    if not settings.accepts_model(model_id):
        raise unknown_model(model_id, settings.model_name)
    return jsonify(_model_card(settings))
