"""End to end on the real tiny DeepSeek-V3 model: HTTP clients vs calling prefill_and_generate directly."""

import json
import os
import socket
import time

import ollama
import openai
import pytest
import requests

from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import chat_openai_process
from ktransformers.server.wsgi import BackgroundServer
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent, TokenEvent
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.utils import prefill_and_generate

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir / "model.gguf", model_path=tiny_model_dir, max_context=96)


class Recorded:
    """Wraps the real generate_fn: counts the tokens each request produced and notes early closes."""

    def __init__(self, generate_fn):
        self.generate_fn = generate_fn
        self.runs = []

    def __call__(self, request):
        run = {"tokens": 0, "closed_early": False}
        self.runs.append(run)
        events = self.generate_fn(request)
        try:
            for event in events:
                run["tokens"] += isinstance(event, TokenEvent)
                yield event
        except GeneratorExit:
            run["closed_early"] = True
            raise
        finally:
            events.close()


@pytest.fixture(scope="module")
def served(loaded):
    recorded = Recorded(model_generate_fn(loaded, cache_tokens=0))   # no prefix reuse: usage counts every prompt token
    engine = Engine(recorded, queue_size=2)
    settings = ServerSettings(model_name="tiny", max_new_tokens=6, max_context=loaded.model.max_context)
    with BackgroundServer(create_app(engine, settings), queue_size=2) as url:
        yield url, engine, recorded
    engine.stop()


def direct(loaded, messages, max_new_tokens):
    """The oracle: the same generation without the server (greedy)."""
    ids = build_prompt_ids(loaded.tokenizer, messages)
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens,
                                       sampling=SamplingParams(temperature=0.0)))
    tokens = [e for e in events if not isinstance(e, FinishEvent)]
    return "".join(e.reasoning for e in tokens), "".join(e.content for e in tokens), events[-1]


def test_openai_stream_matches_direct_generation(served, loaded):
    url, _, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want_reasoning, want_content, finish = direct(loaded, MESSAGES, 6)
    assert (reasoning, content) == (want_reasoning, want_content)
    assert chunks[-1].usage.prompt_tokens == finish.prompt_tokens
    assert chunks[-1].usage.completion_tokens == finish.completion_tokens == 6


def test_ollama_and_openai_non_stream_agree(served, loaded):
    url, _, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    chat = ollama.Client(host=url, timeout=30).chat(model="tiny", messages=MESSAGES,
                                                    options={"num_predict": 4, "temperature": 0})
    want_reasoning, want_content, finish = direct(loaded, MESSAGES, 4)
    assert reply.choices[0].message.content == chat.message.content == want_content
    assert (reply.choices[0].message.model_extra["reasoning_content"], chat.message.thinking or "") == \
           (want_reasoning, want_reasoning)
    assert chat.eval_count == reply.usage.completion_tokens == 4
    assert chat.prompt_eval_count == finish.prompt_tokens


def test_raw_completion_and_context_limit(served, loaded):
    url, _, _ = served
    r = requests.post(url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    long = [{"role": "user", "content": "story " * 200}]
    r = requests.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": long}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_disconnect_mid_stream_frees_the_engine(served):
    url, engine, recorded = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 80, "temperature": 0,
                       "messages": MESSAGES}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 20
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.busy
    assert recorded.runs[-1]["closed_early"] and recorded.runs[-1]["tokens"] < 80
    completed = engine.completed
    r = requests.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and engine.completed == completed + 1


def test_cli_demo_serves_the_tiny_model(tmp_path):
    env = {**os.environ, "KTRANSFORMERS_CACHE": str(tmp_path)}
    with chat_openai_process("--demo", "--api_key", "k", env=env) as (port, banner):
        assert f"http://127.0.0.1:{port}/v1" in banner
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["ktransformers-demo-q4_k_m"]
        reply = client.chat.completions.create(model="ktransformers-demo-q4_k_m", max_tokens=2,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens == 2
