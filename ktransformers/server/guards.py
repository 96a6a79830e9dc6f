"""What every request passes before its route: Host, API key, JSON content type; and CORS.

A server on 127.0.0.1 is still reachable from any web page the user opens:

- DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and calls the API as
  "same origin". The request then carries `Host: evil.example`, so a server bound to loopback
  answers only loopback Host names (and `--allowed_hosts`).
- "Simple" cross-origin requests: a page may POST `text/plain` (or a form) without a CORS
  preflight. The JSON routes refuse every content type but JSON (415), so such a request never
  runs; JSON from another origin needs a preflight, which succeeds only for `--cors_origins`.
- No CORS headers at all unless `--cors_origins` names origins (`*` only when named).
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import Flask, request
from flask_cors import CORS

from ktransformers.server.errors import APIError
from ktransformers.server.settings import ServerSettings

OPEN_PATHS = ("/health", "/")   # reachable without the API key (liveness checks, Ollama's probe)
LOOPBACK_NAMES = ("localhost",)


def host_name(header: str) -> str:
    """The name part of a Host header: 'a.b:8080' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_bind(host: str | None) -> bool:
    """Whether a --host value listens on loopback only (then foreign Host headers are refused)."""
    return bool(host) and is_loopback(host_name(host) if not host.startswith("[") else host.strip("[]"))


def host_allowed(header: str | None, settings: ServerSettings) -> bool:
    if header is None or not (settings.loopback_only or settings.allowed_hosts):
        return True   # HTTP/1.0 without Host cannot come from a browser; a LAN server takes any name
    name = host_name(header)
    allowed = {host_name(h) for h in settings.allowed_hosts}   # a port given with a name is ignored
    return "*" in allowed or name in allowed or is_loopback(name)


def is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def install_guards(app: Flask, settings: ServerSettings) -> None:
    if settings.cors_origins:
        any_origin = "*" in settings.cors_origins
        CORS(app, origins="*" if any_origin else list(settings.cors_origins), send_wildcard=any_origin,
             expose_headers=["Retry-After"])

    @app.before_request
    def check_host():
        if not host_allowed(request.headers.get("Host"), settings):
            raise APIError(403, f"Host {request.headers.get('Host')!r} is not allowed: this server answers "
                                "loopback names (localhost, 127.0.0.1, [::1]) and --allowed_hosts",
                           error_type="invalid_request_error", code="host_not_allowed")

    @app.before_request
    def require_api_key():
        if not settings.api_key or request.method == "OPTIONS" or request.path in OPEN_PATHS:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           error_type="invalid_request_error", code="invalid_api_key")
        return None

    @app.before_request
    def require_json():
        if request.method == "POST" and request.url_rule is not None and not is_json(request.mimetype):
            got = request.mimetype or "none"
            raise APIError(415, f"Content-Type must be application/json (got {got})",
                           error_type="invalid_request_error", code="unsupported_media_type")
        return None
