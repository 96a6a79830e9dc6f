"""Flask app factory: the OpenAI and Ollama routes around one Engine."""

from __future__ import annotations

import hmac

from flask import Flask, jsonify, request
from flask_cors import CORS

from ktransformers.server.engine import Engine
from ktransformers.server.errors import APIError, register_error_handlers
from ktransformers.server.ollama_routes import ollama_routes
from ktransformers.server.openai_routes import openai_routes
from ktransformers.server.openapi import openapi_document
from ktransformers.server.settings import ServerSettings

OPEN_PATHS = ("/health", "/")   # reachable without the API key (liveness checks, Ollama's probe)


def create_app(engine: Engine, settings: ServerSettings) -> Flask:
    app = Flask("ktransformers.server")
    app.config["KT_ENGINE"] = engine
    app.config["KT_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024   # larger bodies get 413, not our memory
    app.json.sort_keys = False          # keep OpenAI's field order; some clients log raw chunks
    app.json.ensure_ascii = False
    CORS(app, expose_headers=["Retry-After"])
    register_error_handlers(app)

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

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "model": settings.model_name, "busy": engine.busy,
                        "waiting": engine.waiting, "queue_size": engine.queue_size, "completed": engine.completed})

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(settings.model_name))

    app.register_blueprint(openai_routes)
    app.register_blueprint(ollama_routes)
    return app
