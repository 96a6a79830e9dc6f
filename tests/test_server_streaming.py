"""Transport and engine behaviour of the running server (waitress + Flask + Engine).

A ScriptedGenerator stands in for the model so each test controls exactly when tokens come.
"""

import json
import logging
import socket
import threading
import time
from urllib.parse import urlparse

import requests

from ktransformers.server.app import create_app
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server, wait_for


def open_stream(url: str, path: str, body: dict) -> socket.socket:
    """POST with a raw socket, so the test sees bytes the moment the server sends them."""
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=5)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def read_until(sock: socket.socket, needle: bytes, received: bytearray, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in received:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before {needle!r}; got {bytes(received)!r}")
        received += chunk


def chat_body(tag: str, max_tokens: int = 6, stream: bool = True) -> dict:
    return {"model": "scripted", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"say {tag}"}]}


def test_first_token_reaches_client_while_generation_is_blocked():
    with scripted_server() as srv:
        srv.generator.hold()
        srv.generator.allow(1)                       # one token, then the model "stalls"
        sock = open_stream(srv.url, "/v1/chat/completions", chat_body("x"))
        received = bytearray()
        read_until(sock, b'"reasoning_content":"hmm0 "', received)
        assert b"HTTP/1.1 200" in received and b"text/event-stream" in received
        assert srv.engine.busy and b"finish_reason\":\"length" not in received
        srv.generator.allow(100)
        read_until(sock, b"data: [DONE]", received)
        sock.close()


def test_client_disconnect_stops_generation_within_one_token_and_server_recovers():
    with scripted_server() as srv:
        srv.generator.hold()
        srv.generator.allow(3)
        sock = open_stream(srv.url, "/v1/chat/completions", chat_body("gone", max_tokens=1000))
        received = bytearray()
        read_until(sock, b'"content":"gone.0 "', received)
        job, = srv.engine.running
        sock.close()
        wait_for(lambda: job.cancelled)              # noticed without any further token
        srv.generator.allow(1)                       # the model produces one more token ...
        wait_for(lambda: not srv.engine.busy)        # ... and the worker closes the generator
        assert srv.generator.closed_early == [(job.request.request_id, 4)]
        srv.generator.permits = None
        reply = requests.post(srv.url + "/v1/chat/completions", json=chat_body("next", stream=False), timeout=5)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == "next.0 next.1 next.2 next.3 "
        assert requests.get(srv.url + "/health", timeout=5).json()["busy"] is False


def test_disconnect_while_blocked_in_stream_write_path_also_cancels():
    """The client leaves while tokens keep flowing: the write fails and the iterator is closed."""
    with scripted_server(token_delay_s=0.01) as srv:
        sock = open_stream(srv.url, "/api/chat", {"model": "scripted",
                                                  "messages": [{"role": "user", "content": "bye"}],
                                                  "options": {"num_predict": 100000}})
        received = bytearray()
        read_until(sock, b'"content":"bye.2 "', received)
        sock.close()
        wait_for(lambda: not srv.engine.busy)
        assert len(srv.generator.closed_early) == 1
        assert srv.generator.closed_early[0][1] < 1000


def test_disconnect_during_non_streaming_generation_cancels_it():
    with scripted_server(token_delay_s=0.002) as srv:
        sock = open_stream(srv.url, "/v1/chat/completions", chat_body("quiet", max_tokens=100_000, stream=False))
        wait_for(lambda: srv.engine.busy)
        time.sleep(0.1)                                   # tokens are flowing, nothing is sent yet
        sock.close()
        wait_for(lambda: not srv.engine.busy)
        assert len(srv.generator.closed_early) == 1 and srv.generator.closed_early[0][1] < 100_000


def test_full_queue_answers_503_with_retry_after():
    with scripted_server(queue_size=1) as srv:
        srv.generator.hold()
        running = open_stream(srv.url, "/v1/chat/completions", chat_body("a"))
        read_until(running, b'"role":"assistant"', bytearray())
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.setdefault("r", requests.post(
            srv.url + "/v1/chat/completions", json=chat_body("b", stream=False), timeout=10)))
        thread.start()
        wait_for(lambda: srv.engine.waiting == 1)
        refused = requests.post(srv.url + "/v1/chat/completions", json=chat_body("c", stream=False), timeout=5)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == str(srv.settings.retry_after_s)
        assert refused.json()["error"]["code"] == "queue_full"
        srv.generator.allow(1000)
        thread.join(10)
        assert waiting["r"].status_code == 200
        assert waiting["r"].json()["choices"][0]["message"]["content"].startswith("b.0 ")
        running.close()


def _stream_text(url: str, tag: str) -> str:
    pieces = []
    with requests.post(url + "/v1/chat/completions", json=chat_body(tag, max_tokens=8), stream=True, timeout=20) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    return "".join(pieces)


def test_concurrent_clients_each_get_exactly_their_own_tokens():
    tags = [f"client{i}" for i in range(5)]
    results = {}
    with scripted_server(queue_size=5, token_delay_s=0.002) as srv:
        threads = [threading.Thread(target=lambda t=t: results.setdefault(t, _stream_text(srv.url, t))) for t in tags]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert srv.engine.completed == len(tags)
    for tag in tags:
        assert results[tag] == "".join(f"{tag}.{i} " for i in range(6))


def test_generation_failure_mid_stream_is_reported_in_band_and_as_500():
    with scripted_server() as srv:
        srv.generator.fail_after = 3
        with requests.post(srv.url + "/v1/chat/completions", json=chat_body("f"), stream=True, timeout=5) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        error = json.loads(lines[-2][6:])["error"]
        assert "scripted failure" in error["message"] and error["type"] == "server_error"
        assert lines[-1] == b"data: [DONE]"
        reply = requests.post(srv.url + "/v1/chat/completions", json=chat_body("f", stream=False), timeout=5)
        assert reply.status_code == 500 and "scripted failure" in reply.json()["error"]["message"]
        srv.generator.fail_after = None
        assert requests.post(srv.url + "/v1/chat/completions", json=chat_body("ok", stream=False),
                             timeout=5).status_code == 200


def test_long_prefill_keeps_sse_headers_and_pings_flowing():
    """Headers and the role chunk leave before the first token, then pings while the model is silent."""
    with scripted_server(settings=ServerSettings(model_name="scripted", stream_ping_s=0.3)) as srv:
        srv.generator.hold()
        sock = open_stream(srv.url, "/v1/chat/completions", chat_body("slow"))
        received = bytearray()
        read_until(sock, b'"role":"assistant"', received)
        assert received.startswith(b"HTTP/1.1 200")
        read_until(sock, b": ping\n\n", received, timeout=3)
        srv.generator.allow(1000)
        read_until(sock, b"data: [DONE]", received)
        sock.close()


def test_client_leaving_while_queued_never_reaches_the_model():
    with scripted_server() as srv:
        srv.generator.hold()
        running = open_stream(srv.url, "/v1/chat/completions", chat_body("first"))
        read_until(running, b'"role":"assistant"', bytearray())
        queued = open_stream(srv.url, "/v1/chat/completions", chat_body("quitter", stream=False))
        wait_for(lambda: srv.engine.waiting == 1)
        queued.close()
        time.sleep(0.6)                                   # > the 0.25 s disconnect poll
        srv.generator.allow(1000)
        read_until(running, b"data: [DONE]", bytearray())
        running.close()
        wait_for(lambda: srv.engine.waiting == 0 and not srv.engine.busy)
        assert srv.engine.completed == 1
        assert [srv.generator.tag_of(r) for r in srv.generator.requests] == ["first"]


def test_one_log_line_per_request_with_tokens_and_timings(caplog):
    caplog.set_level(logging.INFO, logger="ktransformers.server")
    with scripted_server() as srv:
        requests.post(srv.url + "/v1/chat/completions", json=chat_body("log", stream=False), timeout=5)
        wait_for(lambda: any("completion_tokens" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "completion_tokens" in r.getMessage()]
    assert len(lines) == 1
    assert "POST /v1/chat/completions" in lines[0] and "prompt_tokens=2 completion_tokens=6" in lines[0]
    assert "decode=" in lines[0] and "tok/s" in lines[0] and "finish=length" in lines[0]


def test_stream_closed_before_its_first_byte_still_cancels_the_job():
    """A WSGI server may close the body without iterating it (client gone before headers went out)."""
    with scripted_server(token_delay_s=0.002) as srv:
        app = create_app(srv.engine, srv.settings)
        for path, body in [("/v1/chat/completions", chat_body("never", max_tokens=100_000)),
                           ("/api/chat", {"model": "scripted", "messages": [{"role": "user", "content": "never"}],
                                          "options": {"num_predict": 100_000}})]:
            response = app.test_client().post(path, json=body, buffered=False)
            assert response.status_code == 200
            response.close()
            wait_for(lambda: not srv.engine.busy)
        assert [n < 100_000 for _, n in srv.generator.closed_early] == [True, True]
