"""Ollama-compatible routes (what AnythingLLM's and Open-WebUI's Ollama modes call).

Durations are integers in nanoseconds and streams are NDJSON, as Ollama does.  Any model name
is accepted (the served model answers and replies carry its name).  Reasoning goes
to `thinking` unless the request says `think: false` (or the server runs with think_tags),
in which case it is inlined in the content between <think> tags.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, current_app, jsonify, request

from ktransformers.server.engine import PING, GenerationRequest, is_finish
from ktransformers.server.errors import APIError
from ktransformers.server.jobs import RunningJob, collect, generation_error, start_job
from ktransformers.server.logprobs import PendingLogprobs, token_entry
from ktransformers.server.output_rules import history_message, ollama_output_rules
from ktransformers.server.reasoning_format import ReasoningFormatter
from ktransformers.server.schemas import (OllamaChatRequest, OllamaGenerateRequest, OllamaOptions,
                                          OllamaShowRequest)
from ktransformers.server.sse import ndjson_line, ndjson_response
from ktransformers.server.tool_call_replies import ToolCalls, is_tool_call, ollama_call

ollama_routes = Blueprint("ollama", __name__)

OLLAMA_VERSION = "0.12.0"   # what we claim to be; clients gate features on it


def _engine_settings():
    return current_app.config["KT_ENGINE"], current_app.config["KT_SETTINGS"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _sampling(options: OllamaOptions | None) -> dict:
    if options is None:
        return {}
    values = {"temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k,
              "min_p": options.min_p, "seed": options.seed, "presence_penalty": options.presence_penalty,
              "frequency_penalty": options.frequency_penalty, "repetition_penalty": options.repeat_penalty}
    return {k: v for k, v in values.items() if v is not None}


def _max_new_tokens(options: OllamaOptions | None, settings) -> int:
    wanted = options.num_predict if options else None
    return settings.reply_limit(wanted if wanted is not None and wanted > 0 else None)


def _formatter(think, settings) -> ReasoningFormatter:
    if think is False:
        return ReasoningFormatter("think_tags")
    if think is None:
        return ReasoningFormatter(settings.reasoning_format)
    return ReasoningFormatter("deepseek")


def _stats(finish, started: float) -> dict:
    reason = "stop" if finish.finish_reason == "tool_calls" else finish.finish_reason   # Ollama's word for it
    return {"done_reason": reason, "total_duration": _ns(time.monotonic() - started),
            # as Ollama counts it: the prompt tokens evaluated, without those reused from the cache
            "load_duration": 0, "prompt_eval_count": finish.prompt_tokens - finish.cached_tokens,
            "prompt_eval_duration": _ns(finish.prefill_seconds), "eval_count": finish.completion_tokens,
            "eval_duration": _ns(finish.decode_seconds)}


def _loaded_reply(model: str, chat: bool):
    """An empty request only asks to load the model, which is always loaded."""
    body = {"model": model, "created_at": _now(), "done": True, "done_reason": "load"}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return jsonify(body)


def _reply(run: RunningJob, model: str, stream: bool, formatter: ReasoningFormatter, chat: bool, started: float,
           pending: PendingLogprobs):
    """Stream NDJSON or return one object; `chat` picks message{} (chat) vs response (generate)."""
    def piece(reasoning: str, content: str) -> dict:
        if chat:
            message = {"role": "assistant", "content": content}
            if reasoning:
                message["thinking"] = reasoning
            return {"message": message}
        return {"response": content, **({"thinking": reasoning} if reasoning else {})}

    def logprobs(entries) -> dict:
        return {"logprobs": [token_entry(lp) for lp in entries]} if pending.wanted else {}

    base, tool_calls = {"model": model}, ToolCalls()
    if not stream:
        reasoning, content, finish = collect(run, formatter, tool_calls)
        calls = tool_calls.ollama()
        reply = piece(reasoning, content if content.strip() or not calls else "")
        if calls:
            reply["message"]["tool_calls"] = calls
        return jsonify({**base, "created_at": _now(), **reply, **logprobs(run.logprobs), "done": True,
                        **_stats(finish, started)})

    def line(reasoning: str, content: str, done: bool, **stats) -> str:
        entries = pending.take()
        return ndjson_line({**base, "created_at": _now(), **piece(reasoning, content),
                            **(logprobs(entries) if entries else {}), "done": done, **stats})

    def lines():
        try:
            for event in run:
                if event is PING:
                    continue
                if is_tool_call(event):   # each call goes out once it is whole
                    call = tool_calls.add(event)
                    if call is not None:
                        message = {"role": "assistant", "content": "", "tool_calls": [ollama_call(call)]}
                        yield ndjson_line({**base, "created_at": _now(), "message": message, "done": False})
                    continue
                if is_finish(event):
                    # what is left (a </think> closing a reply cut short) goes on its own line: clients
                    # such as AnythingLLM stop reading at done=true, whose content is empty, as Ollama's
                    tail = formatter.finish()
                    if any(tail):
                        yield line(*tail, done=False)
                    yield line("", "", done=True, **_stats(event, started))
                    continue
                pending.add(event)
                reasoning, content = formatter.feed(event.reasoning, event.content)
                if reasoning or content:
                    yield line(reasoning, content, done=False)
        except Exception as exc:
            yield ndjson_line({"error": generation_error(exc).message})
    return ndjson_response(lines(), run.close)


def _serve_generation(schema, chat: bool, build_request):
    """What /api/chat and /api/generate share: parse, answer a load request, run, reply.

    Any model name is accepted (clients send what the user typed); replies name the served model.
    """
    started = time.monotonic()
    engine, settings = _engine_settings()
    body = schema.model_validate_json(request.get_data())
    if not (body.messages if chat else body.prompt):
        return _loaded_reply(settings.model_name, chat)
    gen = build_request(body, settings)
    run = start_job(engine, gen, settings)
    return _reply(run, settings.model_name, body.stream, _formatter(body.think, settings), chat, started,
                  PendingLogprobs(gen.top_logprobs is not None))


def _chat_request(body: OllamaChatRequest, settings) -> GenerationRequest:
    for i, m in enumerate(body.messages):
        if m.images:
            raise APIError(400, f"messages[{i}].images: this model reads text only", param=f"messages[{i}].images")
    messages = [history_message(m, m.content) for m in body.messages]
    return GenerationRequest(max_new_tokens=_max_new_tokens(body.options, settings), messages=messages,
                             sampling=_sampling(body.options), stop=list((body.options and body.options.stop) or []),
                             force_think=settings.force_think, top_logprobs=body.wanted_logprobs,
                             output_rules=ollama_output_rules(body))


def _generate_request(body: OllamaGenerateRequest, settings) -> GenerationRequest:
    if body.images:
        raise APIError(400, "images: this model reads text only", param="images")
    options = body.options
    common = dict(max_new_tokens=_max_new_tokens(options, settings), sampling=_sampling(options),
                  stop=list((options and options.stop) or []), top_logprobs=body.wanted_logprobs,
                  output_rules=ollama_output_rules(body))
    if body.raw:
        return GenerationRequest(prompt=body.prompt, **common)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
               [{"role": "user", "content": body.prompt}]
    return GenerationRequest(messages=messages, force_think=settings.force_think, **common)


@ollama_routes.post("/api/chat")
def chat():
    return _serve_generation(OllamaChatRequest, chat=True, build_request=_chat_request)


@ollama_routes.post("/api/generate")
def generate():
    return _serve_generation(OllamaGenerateRequest, chat=False, build_request=_generate_request)


# ---------------------------------------------------------------- model information

def _details(settings) -> dict:
    return {"parent_model": "", "format": "gguf", "family": settings.model_family,
            "families": [settings.model_family], "parameter_size": settings.parameter_size,
            "quantization_level": settings.quantization_level}


def _model_entry(settings) -> dict:
    return {"name": settings.model_name, "model": settings.model_name,
            "modified_at": datetime.fromtimestamp(settings.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": settings.model_size_bytes,
            "digest": hashlib.sha256(settings.model_name.encode()).hexdigest(),
            "details": _details(settings)}


@ollama_routes.get("/api/version")
def version():
    return jsonify({"version": OLLAMA_VERSION})


@ollama_routes.get("/api/tags")
def tags():
    _, settings = _engine_settings()
    return jsonify({"models": [_model_entry(settings)]})


@ollama_routes.get("/api/ps")
def running_models():
    _, settings = _engine_settings()
    expires = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    return jsonify({"models": [{**_model_entry(settings), "expires_at": expires, "size_vram": 0,
                                "context_length": settings.max_context}]})


@ollama_routes.post("/api/show")
def show():
    _, settings = _engine_settings()
    body = OllamaShowRequest.model_validate_json(request.get_data())
    name = body.model or body.name
    if not name:
        raise APIError(400, "model: required (the model to describe)", param="model")
    family = settings.model_family
    return jsonify({
        "license": "", "modelfile": f"FROM {settings.model_name}\n",
        "parameters": f"num_ctx {settings.max_context}\nnum_predict {settings.max_new_tokens or -1}",
        "template": "{{ .Prompt }}", "details": _details(settings),
        "model_info": {"general.architecture": family, "general.basename": settings.model_name,
                       f"{family}.context_length": settings.max_context},
        "capabilities": ["completion", "thinking", *(["tools"] if settings.supports_tools else [])],
        "modified_at": _model_entry(settings)["modified_at"]})


@ollama_routes.route("/", methods=["GET", "HEAD"])
def root():
    return Response("Ollama is running", mimetype="text/plain")
