"""Flask app factory: the OpenAI and Ollama routes around one Engine."""

from __future__ import annotations

from flask import Flask, jsonify

from ktransformers.server.engine import Engine
from ktransformers.server.errors import register_error_handlers
from ktransformers.server.guards import install_guards
from ktransformers.server.metrics import install_metrics
from ktransformers.server.ollama_routes import ollama_routes
from ktransformers.server.openai_routes import openai_routes
from ktransformers.server.openapi import openapi_document
from ktransformers.server.settings import ServerSettings

# A JSON body may escape each character as \uXXXX (or two, for characters outside the BMP).
BODY_BYTES_PER_PROMPT_CHAR = 12
MIN_BODY_LIMIT = 1 << 20


def create_app(engine: Engine, settings: ServerSettings) -> Flask:
    app = Flask("ktransformers.server")
    app.config["KT_ENGINE"] = engine
    app.config["KT_SETTINGS"] = settings
    # larger bodies get 413 unread: no prompt that fits the context needs more
    app.config["MAX_CONTENT_LENGTH"] = MIN_BODY_LIMIT + BODY_BYTES_PER_PROMPT_CHAR * settings.max_prompt_chars
    app.json.sort_keys = False          # keep OpenAI's field order; some clients log raw chunks
    app.json.ensure_ascii = False
    register_error_handlers(app)
    install_metrics(app, engine)
    install_guards(app, settings)

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "model": settings.model_name, "busy": engine.busy,
                        "running": len(engine.running), "max_batch": engine.max_batch,
                        "waiting": engine.waiting, "queue_size": engine.queue_size, "completed": engine.completed,
                        "stopping": engine.stopping})

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(settings.model_name))

    app.register_blueprint(openai_routes)
    app.register_blueprint(ollama_routes)
    return app
