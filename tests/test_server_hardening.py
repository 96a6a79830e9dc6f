"""Server hardening (issue 13): web pages, bounded work per request, honest errors, connection limits,
and a document that agrees with the server. Real HTTP against waitress on 127.0.0.1 only."""

import json
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import requests
from jsonschema import Draft202012Validator
from transformers import AutoTokenizer, GenerationConfig

from ktransformers.models.loader import LoadedModel
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import OneTokenModel, scripted_server, wait_for
from ktransformers.server.wsgi import BackgroundServer

CHAT = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "say hi"}]}


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send exactly these request lines (no Host added) and read the whole reply (Connection: close)."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"Connection: close\r\n\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def open_stream(url: str, body: dict, path: str = "/v1/chat/completions") -> socket.socket:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=5)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def read_until(sock: socket.socket, needle: bytes, timeout: float = 5.0) -> bytes:
    received, deadline = b"", time.monotonic() + timeout
    while needle not in received:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"closed before {needle!r}: {received!r}")
        received += chunk
    return received


# ---------------------------------------------------------------- 1. safe from web pages

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_cross_origin_simple_post_is_refused_without_cors_headers(content_type):
    """What a browser sends without preflight: refused (415) before any work, and no CORS header to read it."""
    with scripted_server() as srv:
        headers = {"Origin": "http://evil.example"}
        if content_type:
            headers["Content-Type"] = content_type
        r = requests.post(srv.url + "/v1/chat/completions", data=json.dumps(CHAT), headers=headers, timeout=5)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        assert "Access-Control-Allow-Origin" not in r.headers
        assert srv.generator.requests == []
        r = requests.post(srv.url + "/api/chat", data=json.dumps({"model": "m", **CHAT}), headers=headers, timeout=5)
        assert r.status_code == 415 and "Content-Type" in r.json()["error"]
        ok = requests.post(srv.url + "/v1/chat/completions", data=json.dumps(CHAT), timeout=5,
                           headers={"Content-Type": "application/json; charset=utf-8", "Origin": "http://evil.example"})
        assert ok.status_code == 200 and "Access-Control-Allow-Origin" not in ok.headers


def test_cors_star_only_when_named():
    with scripted_server(settings=ServerSettings(model_name="m", cors_origins=("*",))) as srv:
        r = requests.get(srv.url + "/v1/models", headers={"Origin": "http://anywhere.example"}, timeout=5)
        assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("host, allowed", [
    ("evil.example", False), ("evil.example:80", False), ("127.0.0.1.nip.io", False), ("192.168.1.5", False),
    ("localhost", True), ("LOCALHOST:1234", True), ("127.0.0.1:1", True), ("127.1.2.3", True), ("[::1]:8080", True),
    ("myhost.lan:8080", True),
])
def test_loopback_server_refuses_foreign_host_headers(host, allowed):
    settings = ServerSettings(model_name="m", allowed_hosts=("myhost.lan",))
    with scripted_server(settings=settings) as srv:
        body = json.dumps(CHAT).encode()
        reply = raw_request(srv.url, f"POST /v1/chat/completions HTTP/1.1\nHost: {host}\n"
                                     f"Content-Type: application/json\nContent-Length: {len(body)}\n", body)
        status = reply.split(b"\r\n", 1)[0]
        if allowed:
            assert status.endswith(b"200 OK"), reply
        else:
            assert b" 403 " in status and b"host_not_allowed" in reply, reply
            assert srv.generator.requests == []
        health = raw_request(srv.url, f"GET /health HTTP/1.1\nHost: {host}\n")
        assert (b" 200 " in health.split(b"\r\n", 1)[0]) == allowed


def test_lan_server_accepts_any_host_unless_restricted():
    with scripted_server(settings=ServerSettings(model_name="m", loopback_only=False)) as srv:
        assert b" 200 " in raw_request(srv.url, "GET /health HTTP/1.1\nHost: 192.168.1.5:10002\n")[:20]
    settings = ServerSettings(model_name="m", loopback_only=False, allowed_hosts=("gpu-box", "Proxy.example:443"))
    with scripted_server(settings=settings) as srv:
        assert b" 403 " in raw_request(srv.url, "GET /health HTTP/1.1\nHost: evil.example\n")[:20]
        assert b" 200 " in raw_request(srv.url, "GET /health HTTP/1.1\nHost: gpu-box:10002\n")[:20]
        assert b" 200 " in raw_request(srv.url, "GET /health HTTP/1.1\nHost: proxy.example\n")[:20]
        assert b" 200 " in raw_request(srv.url, "GET /health HTTP/1.1\nHost: 127.0.0.1\n")[:20]


# ---------------------------------------------------------------- 2. bounded work per request

@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    """The real backend (tokenizer, chat template, sampler, prefill_and_generate) around OneTokenModel."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = OneTokenModel(tokenizer.encode("a", add_special_tokens=False)[0], len(tokenizer))
    loaded = LoadedModel(model, tokenizer, None, GenerationConfig.from_pretrained(tiny_model_dir))
    engine = Engine(model_generate_fn(loaded), queue_size=2)
    settings = ServerSettings(model_name="tiny", max_new_tokens=4, max_context=model.max_context,
                              max_token_chars=max(len(t) for t in tokenizer.get_vocab()))
    with BackgroundServer(create_app(engine, settings), queue_size=2) as url:
        yield url, model, engine
    model.go.set()
    engine.stop()


def test_huge_prompt_is_refused_unread_in_a_moment(backend):
    url, model, engine = backend
    calls = model.calls
    started = time.monotonic()
    r = requests.post(url + "/v1/chat/completions", timeout=30, json={
        "stream": True, "messages": [{"role": "user", "content": "hello world " * 900_000}]})   # 10.8 MB
    assert time.monotonic() - started < 3.0       # tokenizing it took ~18 s (and ~2 GB)
    assert r.status_code in (400, 413) and r.json()["error"]["message"]   # a body no fitting prompt needs
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello world " * 40_000}]}),
                       ("/v1/completions", {"prompt": "x" * 200_000})]:
        started = time.monotonic()
        r = requests.post(url + path, json=body, timeout=30)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "characters" in r.json()["error"]["message"]
    assert model.calls == calls and not engine.busy


def test_prompts_are_tokenized_off_the_busy_model_worker(backend):
    """While the model works on one request, another's over-long prompt is refused at once."""
    url, model, engine = backend
    model.go.clear()
    first = {}
    thread = threading.Thread(target=lambda: first.setdefault("r", requests.post(
        url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30)))
    thread.start()
    try:
        wait_for(lambda: engine.busy)
        started = time.monotonic()
        over = requests.post(url + "/v1/chat/completions", timeout=30, json={   # ~600 tokens, 3 kB: under the char bound
            "messages": [{"role": "user", "content": "w " * 600}]})
        assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - started < 2.0 and engine.busy
    finally:
        model.go.set()
        thread.join(30)
    assert first["r"].status_code == 200


# ---------------------------------------------------------------- 3. a queued client that leaves frees its slot

def test_queued_client_that_disconnects_frees_its_slot_at_once():
    with scripted_server(queue_size=1) as srv:
        srv.generator.hold()
        running = open_stream(srv.url, {**CHAT, "stream": True, "max_tokens": 100})
        read_until(running, b'"role":"assistant"')
        quitter = open_stream(srv.url, {**CHAT, "stream": False})
        wait_for(lambda: srv.engine.waiting == 1)
        quitter.close()
        wait_for(lambda: srv.engine.waiting == 0, timeout=2.0)   # the running job still runs
        assert srv.engine.busy
        later = {}
        thread = threading.Thread(target=lambda: later.setdefault("r", requests.post(
            srv.url + "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "late"}]},
            timeout=10)))
        thread.start()
        wait_for(lambda: srv.engine.waiting == 1 or "r" in later)
        assert "r" not in later                                # queued, not a false 503
        srv.generator.allow(1000)
        read_until(running, b"data: [DONE]")
        running.close()
        thread.join(10)
        assert later["r"].status_code == 200 and later["r"].json()["choices"][0]["message"]["content"] == "late.0 "


# ---------------------------------------------------------------- 4. validate up front; server faults are 500

def test_tiny_temperature_decodes_greedily_instead_of_nan(backend):
    url, _, _ = backend
    greedy = requests.post(url + "/v1/chat/completions", json={**CHAT, "temperature": 0}, timeout=30)
    for temperature in (1e-39, 1e-30, 5e-324):
        r = requests.post(url + "/v1/chat/completions", json={**CHAT, "temperature": temperature}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"] != {}
        assert r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body, boosted", [({"repetition_penalty": 1e-40}, True), ({"repetition_penalty": 5e-324}, True),
                                           ({"repetition_penalty": 1e300}, False),
                                           ({"repetition_penalty": 1e300, "temperature": 1e-6}, False)])
def test_extreme_penalties_never_sample_outside_the_vocabulary(backend, body, boosted):
    """A penalty that overflows the scores to inf/NaN must still pick a token of the vocabulary."""
    url, _, _ = backend
    greedy = requests.post(url + "/v1/chat/completions", json={**CHAT, "temperature": 0}, timeout=30).json()
    r = requests.post(url + "/v1/chat/completions", json={**CHAT, "temperature": 0.7, "seed": 1, **body}, timeout=30)
    assert r.status_code == 200, r.text
    if boosted:   # the seen token, boosted to infinity, keeps being chosen
        assert r.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


@pytest.mark.parametrize("seed, ok", [(2 ** 64, False), (2 ** 63, False), (-(2 ** 63) - 1, False),
                                      (2 ** 63 - 1, True), (-(2 ** 63), True)])
def test_seed_is_range_checked_before_the_stream_starts(backend, seed, ok):
    url, _, _ = backend
    r = requests.post(url + "/v1/chat/completions", timeout=30,
                      json={**CHAT, "stream": True, "temperature": 0.7, "seed": seed})
    if ok:
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = requests.post(url + "/api/chat", timeout=30, json={"model": "tiny", "stream": False,
                      "options": {"seed": seed, "num_predict": 2}, "messages": CHAT["messages"]})
    assert r.status_code == (200 if ok else 400)


def test_error_during_generation_is_a_server_fault_not_the_clients():
    with scripted_server() as srv:
        def broken(request):
            raise ValueError("internal state went wrong")
            yield
        srv.generator.pieces = broken          # fails after the prompt was accepted
        r = requests.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=5)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with requests.post(srv.url + "/v1/chat/completions", json={**CHAT, "stream": True}, stream=True,
                           timeout=5) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == b"data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error"
        r = requests.post(srv.url + "/api/chat", json={"model": "m", "stream": False, **CHAT}, timeout=5)
        assert r.status_code == 500 and "internal state" in r.json()["error"]
        with requests.post(srv.url + "/api/chat", json={"model": "m", **CHAT}, stream=True, timeout=5) as r:
            last = [line for line in r.iter_lines() if line][-1]
        assert "internal state" in json.loads(last)["error"]


def test_empty_stop_strings_are_refused_up_front():
    with scripted_server() as srv:
        for body, path in [({**CHAT, "stream": True, "stop": ""}, "/v1/chat/completions"),
                           ({**CHAT, "stream": True, "stop": ["ok", ""]}, "/v1/chat/completions"),
                           ({"model": "m", "messages": CHAT["messages"], "options": {"stop": [""]}}, "/api/chat")]:
            r = requests.post(srv.url + path, json=body, timeout=5)
            assert r.status_code == 400 and "stop" in r.text
        assert srv.generator.requests == []


# ---------------------------------------------------------------- 9. idle connections cannot lock others out

def test_many_idle_half_open_connections_leave_health_and_chat_answering():
    with scripted_server() as srv:
        parsed = urlparse(srv.url)
        idle = []
        try:
            for i in range(150):
                sock = socket.create_connection((parsed.hostname, parsed.port), timeout=5)
                if i % 2:    # half a request: headers never finished
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Le")
                idle.append(sock)
            time.sleep(0.3)
            assert requests.get(srv.url + "/health", timeout=3).json()["status"] == "ok"
            assert requests.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=3).status_code == 200
        finally:
            for sock in idle:
                sock.close()


def test_idle_connections_are_closed_after_the_idle_timeout():
    from ktransformers.server.testing import ScriptedGenerator
    from ktransformers.server.wsgi import ConnectionLimits

    engine = Engine(ScriptedGenerator())
    limits = ConnectionLimits(channel_timeout=1, cleanup_interval=1)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="m")), limits=limits) as url:
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=6) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: local")
            started = time.monotonic()
            assert sock.recv(100) == b""          # closed by the server, no reply
            assert time.monotonic() - started < 5
    engine.stop()


# ---------------------------------------------------------------- 10. the document tells the truth

def documented(doc: dict, path: str, method: str = "post") -> Draft202012Validator:
    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": doc["components"]})


REFUSED = [   # (path, body): bodies the server refuses with 400; the document must refuse them too
    ("/v1/chat/completions", {**CHAT, "stop": ""}),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", ""]}),
    ("/v1/chat/completions", {**CHAT, "stop": "x" * 1025}),
    ("/v1/chat/completions", {**CHAT, "stop": [str(i) for i in range(17)]}),
    ("/v1/chat/completions", {**CHAT, "n": 2}),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}),
    ("/v1/chat/completions", {**CHAT, "seed": 2 ** 64}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": []}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
    ("/api/chat", {"model": "m", "messages": CHAT["messages"], "options": {"stop": [""]}}),
    ("/api/chat", {"model": "m", "messages": CHAT["messages"], "options": {"presence_penalty": 5}}),
    ("/api/chat", {"model": "", "messages": CHAT["messages"]}),
    ("/api/generate", {"model": "m", "prompt": "x", "images": ["aGk="]}),
    ("/api/show", {"model": ""}),
    ("/api/show", {"name": ""}),
    ("/api/show", {}),
    ("/api/show", {"model": None}),
]


def test_the_document_refuses_what_the_server_refuses():
    with scripted_server() as srv:
        doc = requests.get(srv.url + "/openapi.json", timeout=5).json()
        for path, body in REFUSED:
            r = requests.post(srv.url + path, json=body, timeout=5)
            assert r.status_code == 400, (path, body, r.text)
            assert not documented(doc, path).is_valid(body), (path, body)
        assert documented(doc, "/api/show").is_valid({"name": "m"})
        assert documented(doc, "/v1/completions").is_valid({"prompt": ["one"]})
        assert srv.generator.requests == []


def test_error_shapes_and_in_band_stream_errors_are_documented():
    with scripted_server() as srv:
        doc = requests.get(srv.url + "/openapi.json", timeout=5).json()

        def validator(path, media, status):
            schema = doc["paths"][path]["post"]["responses"][status]["content"][media]["schema"]
            return Draft202012Validator({**schema, "components": doc["components"]})

        ollama_error = requests.post(srv.url + "/api/chat", json={"model": "m", "messages": "x"}, timeout=5)
        assert ollama_error.status_code == 400
        assert validator("/api/chat", "application/json", "400").is_valid(ollama_error.json())
        assert not validator("/v1/chat/completions", "application/json", "400").is_valid(ollama_error.json())
        openai_error = requests.post(srv.url + "/v1/chat/completions", json={"messages": "x"}, timeout=5)
        assert validator("/v1/chat/completions", "application/json", "default").is_valid(openai_error.json())
        assert not validator("/api/chat", "application/json", "default").is_valid(openai_error.json())

        srv.generator.fail_after = 1
        with requests.post(srv.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5) as r:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        event_schema = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"][
            "text/event-stream"]["schema"]
        assert Draft202012Validator(event_schema).is_valid({"data": "[DONE]"})
        payload = event_schema["properties"]["data"]["anyOf"][1]
        assert payload["contentMediaType"] == "application/json"
        stream = Draft202012Validator({**payload["contentSchema"], "components": doc["components"]})
        assert "error" in events[-1] and all(stream.is_valid(e) for e in events)
        assert not stream.is_valid({"error": "a string is Ollama's shape"})
        assert "[DONE]" in doc["info"]["description"] and "in-band" in doc["info"]["description"]
        for status in ("400", "403", "413", "415", "503"):
            assert status in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
