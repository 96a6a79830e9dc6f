"""The OpenAPI 3.1 document, with request bodies generated from the pydantic models."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from ktransformers import __version__ as package_version
from ktransformers.server import response_schemas, schemas

_REF = "#/components/schemas/{model}"

# (method, path, summary, request model, {media type: response model name or None})
_JSON, _SSE, _NDJSON, _TEXT = "application/json", "text/event-stream", "application/x-ndjson", "text/plain"
ROUTES = [
    ("post", "/v1/chat/completions", "Chat completion (SSE when stream=true)", schemas.ChatCompletionRequest,
     {_JSON: "ChatCompletion", _SSE: "ChatCompletionChunk"}),
    ("post", "/v1/completions", "Text completion (SSE when stream=true)", schemas.CompletionRequest,
     {_JSON: "Completion", _SSE: "Completion"}),
    ("get", "/v1/models", "List the served model", None, {_JSON: "ModelList"}),
    ("get", "/v1/models/{model_id}", "Describe the served model", None, {_JSON: "ModelCard"}),
    ("post", "/api/chat", "Ollama chat (NDJSON unless stream=false)", schemas.OllamaChatRequest, {_NDJSON: None, _JSON: None}),
    ("post", "/api/generate", "Ollama generate (NDJSON unless stream=false)", schemas.OllamaGenerateRequest,
     {_NDJSON: None, _JSON: None}),
    ("post", "/api/show", "Ollama model details", schemas.OllamaShowRequest, {_JSON: None}),
    ("get", "/api/tags", "Ollama model list", None, {_JSON: None}),
    ("get", "/api/ps", "Ollama running models", None, {_JSON: None}),
    ("get", "/api/version", "Ollama version", None, {_JSON: None}),
    ("get", "/health", "Liveness and queue state (no API key needed)", None, {_JSON: None}),
    ("get", "/metrics", "Prometheus metrics (text exposition format)", None, {_TEXT: None}),
]

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "description": "OpenAI's error body; also the in-band `data:` event of a stream that fails after it started "
                   "(then `data: [DONE]` follows)",
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_OLLAMA_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
    "description": "Ollama's error body; also the last NDJSON line of a stream that fails after it started",
}
_STATUS = {
    "400": "Invalid request: a field the schema rejects, or a prompt longer than the context (context_length_exceeded)",
    "401": "Missing or wrong API key (when the server runs with --api_key)",
    "403": "Host header not allowed (a server bound to loopback answers only loopback names and --allowed_hosts)",
    "413": "Request body larger than any prompt that fits the context",
    "415": "Content-Type is not application/json",
    "500": "Server fault",
    "503": "Queue full (Retry-After header) or the server is shutting down",
}
_DESCRIPTION = """Every generation route streams when asked (`stream`): OpenAI routes as Server-Sent Events
(`data: {json}` per chunk, then `data: [DONE]`), Ollama routes as NDJSON. Errors found before the
stream starts are HTTP errors; an error after it started (a server fault, or shutdown) is sent in-band:
an OpenAI error object as one more `data:` event followed by `data: [DONE]`, or Ollama's
`{"error": "..."}` as the last line. A prompt whose text has more characters than the context can hold
tokens is refused before tokenizing (400, code context_length_exceeded); request bodies are limited
accordingly (413). POST bodies must be `application/json` (415 otherwise)."""


def _error_responses(schema_name: str) -> dict:
    content = {"application/json": {"schema": {"$ref": _REF.format(model=schema_name)}}}
    responses = {status: {"description": text, "content": content} for status, text in _STATUS.items()}
    responses["413"] = {"description": _STATUS["413"] + " (over 64 MiB the HTTP layer answers in plain text)",
                        "content": {**content, "text/plain": {"schema": {"type": "string"}}}}
    responses["default"] = {"description": "Other errors (404 unknown route, 405 method)", "content": content}
    return responses


def _stream_schema(kind: str, chunk: str | None, error: str) -> dict:
    """One stream item: an NDJSON line, or an SSE event whose `data` is JSON (or the final `[DONE]`),
    written as Open API 3.2 describes events (`data` with contentMediaType and contentSchema)."""
    item = {"anyOf": [{"$ref": _REF.format(model=chunk)} if chunk else {"type": "object"},
                      {"$ref": _REF.format(model=error)}]}
    if kind == _NDJSON:
        return item
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": item}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def openapi_document(model_name: str) -> dict:
    # "validation" mode for responses too: a field with a default may be absent on the wire
    models = [(m, "validation") for m in schemas.ALL_REQUEST_MODELS + response_schemas.ALL_RESPONSE_MODELS]
    refs, defs = models_json_schema(models, ref_template=_REF)
    components = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA, "OllamaError": _OLLAMA_ERROR_SCHEMA}
    paths: dict[str, dict] = {}
    for method, path, summary, model, media in ROUTES:
        error = "OllamaError" if path.startswith("/api/") else "Error"
        content = {}
        for kind, name in media.items():
            if kind in (_SSE, _NDJSON):
                content[kind] = {"schema": _stream_schema(kind, name, error)}
            elif kind == _TEXT:
                content[kind] = {"schema": {"type": "string"}}
            else:
                content[kind] = {"schema": {"$ref": _REF.format(model=name)} if name else {"type": "object"}}
        operation = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                "200": {"description": "Success (a stream carries one schema instance per event or line; "
                                       "an error after the stream started is one more instance, of the error shape)",
                        "content": content},
                **_error_responses(error),
            },
        }
        if "{model_id}" in path:
            operation["parameters"] = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if model is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(model, "validation")]}}}
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": f"ktransformers server ({model_name})", "version": package_version,
                 "description": _DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
