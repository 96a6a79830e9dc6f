"""Wire formats for streamed responses: Server-Sent Events (OpenAI) and NDJSON (Ollama)."""

from __future__ import annotations

import json
from typing import Callable, Iterable

from flask import Response
from werkzeug.wsgi import ClosingIterator

SSE_DONE = "data: [DONE]\n\n"
SSE_PING = ": ping\n\n"   # a comment line: clients ignore it, proxies and timeouts see traffic


def _json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse_event(payload: dict) -> str:
    return f"data: {_json(payload)}\n\n"


def ndjson_line(payload: dict) -> str:
    return _json(payload) + "\n"


def _streaming(chunks: Iterable[str], mimetype: str, on_close: Callable[[], None]) -> Response:
    # on_close also runs when the body was never started (client gone before the first byte),
    # where a generator's own `finally` would not
    response = Response(ClosingIterator(chunks, [on_close]), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"   # nginx in front must not buffer either
    return response


def sse_response(chunks: Iterable[str], on_close: Callable[[], None]) -> Response:
    return _streaming(chunks, "text/event-stream", on_close)


def ndjson_response(chunks: Iterable[str], on_close: Callable[[], None]) -> Response:
    return _streaming(chunks, "application/x-ndjson", on_close)
