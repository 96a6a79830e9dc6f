"""A scripted stand-in for the model, for tests and client integration checks without weights.

`ScriptedGenerator` is a `generate_fn` for `Engine`: it thinks a few words, then answers with
words that carry the request's last message (so a test can tell whose tokens it received),
and records what happened (requests seen, generators closed early).
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
import time

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine, GenerationRequest, PromptAccepted
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer
from ktransformers.util.events import ContextLengthError, FinishEvent, TokenEvent


class ScriptedGenerator:
    def __init__(self, reasoning_words: int = 2, max_context: int = 200, token_delay_s: float = 0.0):
        self.reasoning_words = reasoning_words
        self.max_context = max_context
        self.token_delay_s = token_delay_s
        self.permits: threading.Semaphore | None = None  # when set, each token takes one permit
        self.requests: list[GenerationRequest] = []
        self.closed_early: list[tuple[str, int]] = []  # (request_id, tokens yielded before close)
        self.fail_after: int | None = None            # raise RuntimeError after this many tokens

    def hold(self) -> None:
        """From now on each token waits for `allow`."""
        self.permits = threading.Semaphore(0)

    def allow(self, tokens: int = 1) -> None:
        if self.permits is not None:
            self.permits.release(tokens)

    @staticmethod
    def tag_of(request: GenerationRequest) -> str:
        text = request.messages[-1]["content"] if request.messages else request.prompt
        return text.split()[-1] if text.split() else "empty"

    def pieces(self, request: GenerationRequest):
        """Endless (reasoning, content) pieces, one per token: `hmm0 hmm1 ` then `<tag>.0 <tag>.1 ...`."""
        tag = self.tag_of(request)
        for i in range(self.reasoning_words):
            yield f"hmm{i} ", ""
        for i in itertools.count():
            yield "", f"{tag}.{i} "

    def prepare(self, request: GenerationRequest) -> None:
        """Runs on the request thread (as the real backend's tokenizing does): one token per word."""
        text = " ".join(m["content"] for m in request.messages) if request.messages else request.prompt
        request.prompt_ids = list(range(len(text.split())))
        if len(request.prompt_ids) >= self.max_context:
            raise ContextLengthError(len(request.prompt_ids), self.max_context)

    def __call__(self, request: GenerationRequest):
        return self._generate(request)

    def _generate(self, request: GenerationRequest):
        self.requests.append(request)
        if request.prompt_ids is None:
            self.prepare(request)
        prompt_tokens = len(request.prompt_ids)
        yield PromptAccepted(prompt_tokens)
        count, finish_reason, started = 0, "length", time.perf_counter()
        try:
            for r, c in itertools.islice(self.pieces(request), request.max_new_tokens):
                if self.permits is not None:
                    self.permits.acquire()
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                if self.fail_after is not None and count >= self.fail_after:
                    raise RuntimeError("scripted failure")
                raw = (f"<think>{r}" if count == 0 and r else r) + c
                yield TokenEvent(token_id=count, text=raw, reasoning=r, content=c)
                count += 1
                if any(s in c for s in request.stop):
                    finish_reason = "stop"
                    break
        except GeneratorExit:  # suspended at a yield: that token had been handed out
            self.closed_early.append((request.request_id, count + 1))
            raise
        elapsed = time.perf_counter() - started
        yield FinishEvent(finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=count,
                          prefill_seconds=0.001, decode_seconds=elapsed,
                          prefill_tokens_per_s=prompt_tokens / 0.001, decode_tokens_per_s=count / max(elapsed, 1e-9))


class OneTokenModel:
    """A model for the real backend (ModelBackend, prefill_and_generate) in tests: logits that make any
    sampler pick `token`, so only the limits end a reply; each forward waits for `go` (set by default),
    so a test can hold the worker."""

    def __init__(self, token: int, vocab_size: int, max_context: int = 256):
        self.token, self.vocab_size, self.max_context = token, vocab_size, max_context
        self.go = threading.Event()
        self.go.set()
        self.calls = 0

    def __call__(self, input_ids, start_pos: int):
        import torch   # here, so the scripted server process does not load torch

        self.calls += 1
        self.go.wait(30)
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.token] = 100.0
        return logits


@dataclass
class ScriptedServer:
    url: str
    generator: ScriptedGenerator
    engine: Engine
    settings: ServerSettings


def wait_for(condition, timeout: float = 5.0) -> None:
    """Poll `condition()` until it is true; AssertionError after `timeout` seconds (for tests)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@contextmanager
def chat_openai_process(*args: str, env: dict | None = None):
    """`python chat_openai.py ARGS --port P` on a free loopback port, for tests: yields (port, banner)
    once its "Serving" line is out (AssertionError with its output if it exits first), then stops it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parents[2] / "chat_openai.py"
    proc = subprocess.Popen([sys.executable, str(script), *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = ""
        while "Serving" not in banner:
            line = proc.stdout.readline()
            assert line, f"server exited early:\n{banner}"
            banner += line
        yield port, banner
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def scripted_server(settings: ServerSettings | None = None, queue_size: int = 4, **generator_options):
    """The real app and waitress, in a background thread, around a ScriptedGenerator."""
    generator = ScriptedGenerator(**generator_options)
    engine = Engine(generator, queue_size=queue_size)
    settings = settings or ServerSettings(model_name="scripted")
    with BackgroundServer(create_app(engine, settings), queue_size=queue_size) as url:
        try:
            yield ScriptedServer(url, generator, engine, settings)
        finally:
            generator.allow(1_000_000)   # free any token a test left waiting
            engine.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m ktransformers.server.testing --port N`: the scripted server as a process, served and
    shut down (SIGTERM, Ctrl-C) exactly as chat_openai.py serves a model."""
    import argparse
    import logging

    from ktransformers.server.wsgi import create_server, serve_until_stopped

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token_delay_s", type=float, default=0.05)
    p.add_argument("--queue_size", type=int, default=4)
    p.add_argument("--shutdown_grace", type=float, default=5.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(ScriptedGenerator(token_delay_s=args.token_delay_s), queue_size=args.queue_size)
    app = create_app(engine, ServerSettings(model_name="scripted"))
    server = create_server(app, "127.0.0.1", args.port, args.queue_size)
    print(f"Serving 'scripted' on http://127.0.0.1:{args.port}", flush=True)
    serve_until_stopped(server, engine, grace_s=args.shutdown_grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
