"""SIGTERM (systemd, docker stop) and Ctrl-C shut the server down gracefully (issue 13, item 7):
new requests are refused at once, running streams end cleanly ([DONE] / the last NDJSON line),
and the process exits 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "say bye"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server process, waited for until it prints its banner."""

    def __init__(self, argv: list[str], env: dict | None = None, startup_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(argv + ["--port", str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.output: list[str] = []
        banner = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.output.append(line)
                if line.startswith("Serving"):
                    banner.set()
        threading.Thread(target=pump, daemon=True).start()
        if not banner.wait(startup_s):
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.output))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Stream:
    """A streamed request read in a thread: lines as they come, and when the first content arrived."""

    def __init__(self, url: str, body: dict, path: str = "/v1/chat/completions"):
        self.lines: list[bytes] = []
        self.status = None
        self.started = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._read, args=(url + path, body), daemon=True)
        self.thread.start()

    def _read(self, url, body):
        try:
            with requests.post(url, json=body, stream=True, timeout=60) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        if b"content" in line or b"response" in line:
                            self.started.set()
        except Exception as exc:   # noqa: BLE001 - reported by the test
            self.error = exc
        self.started.set()

    def join(self, timeout: float = 30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not end"
        assert self.error is None, self.error


def scripted(grace: float, token_delay_s: float = 0.05) -> Process:
    return Process([sys.executable, "-m", "ktransformers.server.testing", "--token_delay_s", str(token_delay_s),
                    "--shutdown_grace", str(grace)], startup_s=60)


def refused_meanwhile(url: str) -> bool:
    """A new request during shutdown: 503, or no connection at all."""
    try:
        r = requests.post(url + "/v1/chat/completions", json={**CHAT, "stream": False}, timeout=5)
    except requests.ConnectionError:
        return True
    return r.status_code == 503


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_the_running_stream_finish_within_the_grace_period(sig):
    server = scripted(grace=20)
    try:
        stream = Stream(server.url, {**CHAT, "max_tokens": 30})                       # ~1.5 s of tokens
        assert stream.started.wait(10)
        server.proc.send_signal(sig)
        time.sleep(0.2)
        assert refused_meanwhile(server.url)
        stream.join()
        assert stream.status == 200
        assert json.loads(stream.lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert stream.lines[-1] == b"data: [DONE]"
        assert server.proc.wait(15) == 0
    finally:
        server.stop()


def test_stream_past_the_grace_period_ends_in_band_then_exit_0():
    server = scripted(grace=0.5)
    try:
        stream = Stream(server.url, {**CHAT, "max_tokens": 100_000})
        assert stream.started.wait(10)
        ollama = Stream(server.url, {"model": "m", "messages": CHAT["messages"], "options": {"num_predict": 100_000}},
                        path="/api/chat")   # waits in the queue behind the first
        time.sleep(0.5)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        stream.join()
        ollama.join()
        error = json.loads(stream.lines[-2][6:])["error"]
        assert error["type"] == "server_error" and error["code"] == "server_shutting_down"
        assert stream.lines[-1] == b"data: [DONE]"
        assert ollama.status == 503 and "shutting down" in json.loads(ollama.lines[-1])["error"]
        assert server.proc.wait(15) == 0
        assert time.monotonic() - started < 8
        assert "Traceback" not in "".join(server.output)
    finally:
        server.stop()


def test_demo_server_stops_gracefully_on_sigterm(tmp_path):
    """The real entry point on the demo model: SIGTERM mid-stream, stream ends cleanly, exit 0."""
    env = {**os.environ, "KTRANSFORMERS_CACHE": os.environ.get("KTRANSFORMERS_CACHE") or str(tmp_path)}
    server = Process([sys.executable, str(REPO / "chat_openai.py"), "--demo", "--shutdown_grace", "0.5"], env=env)
    try:
        stream = Stream(server.url, {**CHAT, "max_tokens": 100_000})
        assert stream.started.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        stream.join(60)
        assert stream.status == 200 and stream.lines[-1] == b"data: [DONE]"
        last = json.loads(stream.lines[-2][6:])
        assert last.get("error", {}).get("code") == "server_shutting_down" or last["choices"][0]["finish_reason"]
        assert server.proc.wait(20) == 0
    finally:
        server.stop()
