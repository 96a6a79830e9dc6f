"""Errors that become HTTP responses: OpenAI's {"error": {...}} body, or Ollama's {"error": "..."}."""

from __future__ import annotations

import logging
import re

import pydantic
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("ktransformers.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    503: "server_overloaded",
}


class APIError(Exception):
    """An error with everything its HTTP response needs."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers or {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> tuple:
    """Drop pydantic's union-member tags ('str', 'list[ContentPart]', 'ContentPart') from a location."""
    return tuple(part for part in loc if not isinstance(part, str)
                 or (re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in _TYPE_TAGS))


def validation_error(exc: pydantic.ValidationError) -> APIError:
    """Name the offending field the way OpenAI does (param = dotted path); of a union's
    alternatives, the one that got furthest into the value."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"Malformed JSON body: {first['msg']}", code="invalid_json")
    paths = [_field_path(e["loc"]) for e in errors]
    best = max((i for i, path in enumerate(paths) if path[:len(paths[0])] == paths[0]), key=lambda i: len(paths[i]))
    ordered = [best] + [i for i in range(len(errors)) if i != best]
    param = ".".join(str(part) for part in paths[best]) or None
    message = "; ".join(f"{'.'.join(str(p) for p in paths[i]) or 'body'}: {errors[i]['msg']}" for i in ordered[:5])
    return APIError(400, f"Invalid request: {message}", param=param, code="invalid_value")


def unknown_model(name: str, served: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{served}'",
                    param="model", code="model_not_found")


def _is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_response(err: APIError):
    body = {"error": err.message} if _is_ollama_path(request.path) else err.openai_body()
    response = jsonify(body)
    response.status_code = err.status
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(APIError, error_response)

    @app.errorhandler(pydantic.ValidationError)
    def _validation(exc: pydantic.ValidationError):
        return error_response(validation_error(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if exc.code == 404:
            err = APIError(404, f"Unknown route {request.method} {request.path}", code="unknown_url")
        else:   # keep werkzeug's headers such as Allow on 405
            headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
            err = APIError(exc.code or 500, exc.description or exc.name, headers=headers)
        return error_response(err)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}: {exc}",
                                       error_type="server_error"))
