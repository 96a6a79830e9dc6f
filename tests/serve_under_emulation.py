"""`chat_openai.py --demo` under an emulated CPU answers a streamed chat (run by tests/emulated_cpus.sh).

    python3 tests/serve_under_emulation.py --cpu Nehalem --expect-log "native kernels need AVX2+FMA"

Starts the server as `qemu-x86_64 -cpu CPU python chat_openai.py --demo` on a free loopback port,
waits for /health, streams one chat completion with the openai SDK from this (native) process,
checks the server's log for the expected line, then stops the server. Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before answering")
        try:
            if requests.get(f"{base}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit("the server did not answer /health in time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", required=True, help="qemu CPU model, e.g. Nehalem or Haswell")
    p.add_argument("--expect-log", default="", help="a line fragment the server's log must contain")
    p.add_argument("--timeout", type=float, default=600, help="seconds for start-up and the answer together")
    args = p.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryFile("w+") as log:
        env = {**os.environ, "KTRANSFORMERS_CACHE": cache, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen(["qemu-x86_64", "-cpu", args.cpu, sys.executable, str(ROOT / "chat_openai.py"),
                                   "--demo", "--host", "127.0.0.1", "--port", str(port), "--cpu_infer", "2"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(base, server, time.monotonic() + args.timeout)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=args.timeout, max_retries=0)
            stream = client.chat.completions.create(model="demo", stream=True, max_tokens=8,
                                                    messages=[{"role": "user", "content": "What is 2 + 3?"}])
            chunks = list(stream)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            if finish not in (["stop"], ["length"]):
                raise SystemExit(f"the stream ended without one finish_reason: {finish}")
            print(f"{args.cpu}: streamed {len(chunks)} chunks, finish_reason {finish[0]}")
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
            log.seek(0)
            output = log.read()
        if args.expect_log not in output:
            print(output[-4000:], file=sys.stderr)
            raise SystemExit(f"the server's log lacks {args.expect_log!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
