#!/usr/bin/env python3
"""Serve a DeepSeek-V3/R1 GGUF over an OpenAI- and Ollama-compatible streaming API.

    python chat_openai.py --model_path DIR --gguf_path PATH [--port 10002] [--api_key KEY]
    python chat_openai.py --demo          # the shipped demo model (a tiny DeepSeek-V3 that does arithmetic)

Point clients at http://HOST:PORT/v1 (OpenAI) or http://HOST:PORT (Ollama).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import gguf

from ktransformers.demo import DEFAULT_VARIANT as DEFAULT_DEMO_VARIANT
from ktransformers.demo import demo_model_name, demo_paths, variant_name
from ktransformers.gguf import GGUFModel
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.guards import is_loopback_bind
from ktransformers.server.scheduler import DEFAULT_PREFILL_SLICE
from ktransformers.server.settings import REASONING_FORMATS, ServerSettings
from ktransformers.server.startup_checks import (StartupError, check_chat_template, check_model_files,
                                                 non_negative_int, port_number, positive_int)
from ktransformers.server.wsgi import DEFAULT_LIMITS, ConnectionLimits, bind_sockets, create_server, serve_until_stopped

log = logging.getLogger("ktransformers.server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="directory with config.json and tokenizer files (optional: GGUF metadata otherwise)")
    p.add_argument("--gguf_path", help=".gguf file, one part of a split set, or their directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for the LAN)")
    p.add_argument("--port", type=port_number, default=10002, help="1..65535 (default 10002)")
    p.add_argument("--model_name", help="name clients use (default: the model directory or GGUF name)")
    p.add_argument("--api_key", default=os.environ.get("KTRANSFORMERS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default $KTRANSFORMERS_API_KEY; none = open)")
    p.add_argument("--max_context", type=int, default=4096, help="KV cache length in tokens")
    p.add_argument("--max_new_tokens", type=int,
                   help="cap on reply tokens for requests that name none (default: no cap, a reply may fill "
                        "the context window, as with OpenAI and Ollama)")
    p.add_argument("--force_think", action="store_true", help="start every chat answer inside <think>")
    p.add_argument("--reasoning_format", choices=REASONING_FORMATS, default="deepseek",
                   help="deepseek: reasoning in reasoning_content (default); think_tags: inline <think>...</think>; "
                        "llama.cpp's auto (= deepseek), none (= think_tags) and deepseek-legacy (both) also work")
    p.add_argument("--optimize_config_path", help="placement rules YAML")
    p.add_argument("--cpu_infer", type=int, help="CPU threads for the routed experts")
    p.add_argument("--queue_size", type=int, default=8, help="requests that may wait; more get 503")
    p.add_argument("--max_batch", type=positive_int, default=None,
                   help="requests decoded together, each with its own KV cache slot (default: as many as fit "
                        "in a tenth of the GPU's memory, or of RAM when CPU-only, at most 8)")
    p.add_argument("--prefill_slice", type=non_negative_int, default=None,
                   help="prompt tokens prefilled per step while other requests stream, so their tokens keep "
                        f"coming (default {DEFAULT_PREFILL_SLICE}, or whole chunks where long prefill chunks stream "
                        "the experts to the GPU; 0: whole chunks; a lone request always prefills whole chunks)")
    p.add_argument("--cache_tokens", type=int, default=16384,
                   help="prefix cache: KV rows of earlier conversations kept in RAM for reuse (about 70 KB a "
                        "token for DeepSeek-V3); the live conversation is always reused; 0 turns prefix reuse off")
    p.add_argument("--cors_origins", type=comma_list, default=(),
                   help="browser origins allowed to call the API, comma-separated ('*' = any; default: none)")
    p.add_argument("--allowed_hosts", type=comma_list, default=(),
                   help="Host names accepted besides localhost/127.0.0.1/[::1], comma-separated "
                        "('*' = any; default: loopback names only when --host is loopback, any otherwise)")
    p.add_argument("--max_connections", type=int, default=DEFAULT_LIMITS.connection_limit,
                   help=f"open connections served at once (default {DEFAULT_LIMITS.connection_limit})")
    p.add_argument("--idle_timeout", type=int, default=DEFAULT_LIMITS.channel_timeout,
                   help="seconds before an idle (or never completed) connection is closed "
                        f"(default {DEFAULT_LIMITS.channel_timeout})")
    p.add_argument("--shutdown_grace", type=float, default=5.0,
                   help="on SIGTERM/Ctrl-C, seconds running replies may take to finish (default 5)")
    p.add_argument("--demo", nargs="?", const=DEFAULT_DEMO_VARIANT, metavar="VARIANT", type=demo_variant,
                   help="serve the shipped demo model, a tiny DeepSeek-V3 trained to do arithmetic: "
                        "q4_k_m (default), q8_0, iq1_s or f32 (the bf16 reference)")
    args = p.parse_args(argv)
    if not args.demo and not args.gguf_path:
        p.error("--gguf_path is required (or use --demo to try the server with a tiny model)")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api_key (or $KTRANSFORMERS_API_KEY) is empty: give a key, or unset it to leave the server open")
    if args.shutdown_grace < 0:
        p.error(f"--shutdown_grace must be >= 0, got {args.shutdown_grace}")
    if args.cache_tokens < 0:
        p.error(f"--cache_tokens must be >= 0, got {args.cache_tokens}")
    for option in ("queue_size", "max_context", "max_new_tokens", "cpu_infer", "max_connections", "idle_timeout"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option} must be >= 1, got {value}")
    return args


def comma_list(text: str) -> tuple[str, ...]:
    """argparse type: 'a, b' -> ('a', 'b')."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def demo_variant(value: str) -> str:
    """argparse type of --demo: a shipped demo variant (ktransformers.demo.VARIANTS or an alias)."""
    try:
        return variant_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def demo_model(variant: str = DEFAULT_DEMO_VARIANT) -> tuple[Path, Path]:
    """(model_dir, gguf_path) of the demo model shipped in the package (ktransformers/demo/model)."""
    return demo_paths(variant)


def describe_gguf(model: GGUFModel) -> dict:
    """Size, parameter count label and quantization of the GGUF, for /api/tags and /api/show."""
    meta = model.metadata
    file_type = meta.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        quant = str(file_type)
    return {"model_size_bytes": sum(f.stat().st_size for f in model.files),
            "parameter_size": str(meta.get("general.size_label", "")),
            "quantization_level": quant, "model_family": model.architecture}


def default_model_name(model_path: str | None, gguf_path: str) -> str:
    if model_path:
        return Path(model_path).resolve().name
    path = Path(gguf_path).resolve()
    name = path.name if path.is_dir() else path.name.split("-0000")[0].removesuffix(".gguf")
    return name or "ktransformers"


def fail(message: str) -> int:
    """Bad input: one line, as argparse and local_chat report it (exit status 2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind host:port now, before minutes of model loading; a busy port fails in a second."""
    try:
        return bind_sockets(host, port)
    except OSError as err:
        hint = " (another server runs there: stop it or pick another --port)" if err.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None
    except ValueError as err:   # waitress: the host does not resolve
        raise StartupError(f"cannot listen on {host}:{port}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sockets = reserve_port(args.host, args.port)
    except StartupError as err:
        return fail(str(err))
    try:
        return serve(args, sockets)
    except KeyboardInterrupt:   # Ctrl-C during the model load
        return 130
    finally:
        for sock in sockets:    # waitress closes those it took; closing twice is harmless
            sock.close()


def serve(args: argparse.Namespace, sockets: list[socket.socket]) -> int:
    if args.demo:
        demo, demo_gguf = demo_model(args.demo)
        args.model_path, args.gguf_path = str(demo), str(demo_gguf)
        args.model_name = args.model_name or demo_model_name(args.demo)
        trained_context = json.loads((demo / "config.json").read_text())["max_position_embeddings"]
        args.max_context = min(args.max_context, trained_context)

    try:
        gguf_model = check_model_files(args.gguf_path, args.model_path)
        from ktransformers.models.loader import load_model      # heavy imports after argument errors
        loaded = load_model(args.gguf_path, model_path=args.model_path, optimize_config_path=args.optimize_config_path,
                            max_context=args.max_context, cpu_infer=args.cpu_infer, max_batch=args.max_batch)
        check_chat_template(loaded.tokenizer, args.model_path or args.gguf_path, args.force_think)
    except (ValueError, OSError) as err:    # bad files or options: the loader's messages name them
        return fail(str(err))
    from ktransformers.server.model_backend import default_prefill_slice, longest_token_chars, model_generate_fn

    generate = model_generate_fn(loaded, args.cache_tokens)
    settings = ServerSettings(
        model_name=args.model_name or default_model_name(args.model_path, args.gguf_path),
        api_key=args.api_key, max_new_tokens=args.max_new_tokens, max_context=int(loaded.model.max_context),
        reasoning_format=args.reasoning_format, force_think=args.force_think, created=int(time.time()),
        max_token_chars=longest_token_chars(loaded.tokenizer), cors_origins=args.cors_origins,
        allowed_hosts=args.allowed_hosts, loopback_only=is_loopback_bind(args.host),
        supports_tools=generate.structured.format is not None, **describe_gguf(gguf_model))
    prefill_slice = default_prefill_slice(loaded.model) if args.prefill_slice is None else args.prefill_slice or None
    engine = Engine(generate, queue_size=args.queue_size, max_batch=loaded.model.n_slots, prefill_slice=prefill_slice)
    limits = ConnectionLimits(connection_limit=args.max_connections, channel_timeout=args.idle_timeout)
    server = create_server(create_app(engine, settings), None, None, args.queue_size, sockets=sockets, limits=limits)
    base = f"http://{args.host}:{args.port}"
    print(f"Serving '{settings.model_name}' - OpenAI base URL: {base}/v1   Ollama URL: {base}"
          f"{'   (API key required)' if settings.api_key else ''}", flush=True)
    serve_until_stopped(server, engine, grace_s=args.shutdown_grace)   # SIGTERM and Ctrl-C: drain, then return
    return 0


if __name__ == "__main__":
    sys.exit(main())
