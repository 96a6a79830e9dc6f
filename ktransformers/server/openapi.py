"""The OpenAPI 3.1 document, with request bodies generated from the pydantic models."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from ktransformers import __version__ as package_version
from ktransformers.server import response_schemas, schemas

_REF = "#/components/schemas/{model}"

# (method, path, summary, request model, {media type: response model name or None})
_JSON, _SSE, _NDJSON = "application/json", "text/event-stream", "application/x-ndjson"
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
]

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def openapi_document(model_name: str) -> dict:
    # "validation" mode for responses too: a field with a default may be absent on the wire
    models = [(m, "validation") for m in schemas.ALL_REQUEST_MODELS + response_schemas.ALL_RESPONSE_MODELS]
    refs, defs = models_json_schema(models, ref_template=_REF)
    components = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA}
    paths: dict[str, dict] = {}
    for method, path, summary, model, media in ROUTES:
        content = {kind: {"schema": {"$ref": _REF.format(model=name)} if name else {"type": "object"}}
                   for kind, name in media.items()}
        operation = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                "200": {"description": "Success (streams carry one schema instance per event or line)",
                        "content": content},
                "default": {"description": "Error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
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
        "info": {"title": f"ktransformers server ({model_name})", "version": package_version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
