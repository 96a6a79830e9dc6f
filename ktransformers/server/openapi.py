"""The OpenAPI 3.1 document, with request bodies generated from the pydantic models."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from ktransformers import __version__ as package_version
from ktransformers.server import schemas

_REF = "#/components/schemas/{model}"

# (method, path, summary, request model or None, response media type)
ROUTES = [
    ("post", "/v1/chat/completions", "Chat completion (SSE when stream=true)", schemas.ChatCompletionRequest, "application/json"),
    ("post", "/v1/completions", "Text completion (SSE when stream=true)", schemas.CompletionRequest, "application/json"),
    ("get", "/v1/models", "List the served model", None, "application/json"),
    ("get", "/v1/models/{model_id}", "Describe the served model", None, "application/json"),
    ("post", "/api/chat", "Ollama chat (NDJSON unless stream=false)", schemas.OllamaChatRequest, "application/x-ndjson"),
    ("post", "/api/generate", "Ollama generate (NDJSON unless stream=false)", schemas.OllamaGenerateRequest, "application/x-ndjson"),
    ("post", "/api/show", "Ollama model details", schemas.OllamaShowRequest, "application/json"),
    ("get", "/api/tags", "Ollama model list", None, "application/json"),
    ("get", "/api/ps", "Ollama running models", None, "application/json"),
    ("get", "/api/version", "Ollama version", None, "application/json"),
    ("get", "/health", "Liveness and queue state (no API key needed)", None, "application/json"),
]

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def openapi_document(model_name: str) -> dict:
    refs, defs = models_json_schema([(m, "validation") for m in schemas.ALL_REQUEST_MODELS], ref_template=_REF)
    components = {**defs.get("$defs", {}), "Error": _ERROR_SCHEMA}
    paths: dict[str, dict] = {}
    for method, path, summary, model, media in ROUTES:
        operation = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                "200": {"description": "Success", "content": {media: {"schema": {"type": "object"}}}},
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
