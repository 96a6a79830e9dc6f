"""Bounded schema fuzz of the running demo server (issue 13): schemathesis generates requests from
/openapi.json, valid and invalid, and each reply must be no 5xx, no hang, and what the document says
(status, content type, JSON body schema; invalid bodies refused with 4xx).

Fixed seed and example count, so a run is repeatable: FUZZ_EXAMPLES generated cases per operation
plus schemathesis' boundary (coverage) cases, about 1,100 requests over the 11 operations, 30-40 s
on two cores, never more than FUZZ_BUDGET_S. Independent of the demo model's text: only shapes,
statuses and timing are checked.
"""

import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

REPO = Path(__file__).resolve().parents[1]
FUZZ_SEED = 20261202
FUZZ_EXAMPLES = 30
REQUEST_TIMEOUT_S = 30       # a reply slower than this is a hang
FUZZ_BUDGET_S = 300          # the whole fuzz: cases left after this are not sent (a warning says so)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`chat_openai.py --demo` on a free port; a short context keeps every generation brief."""
    port = free_port()
    env = {**os.environ, "KTRANSFORMERS_CACHE": os.environ.get("KTRANSFORMERS_CACHE")
           or str(tmp_path_factory.mktemp("kt-cache"))}
    proc = subprocess.Popen([sys.executable, str(REPO / "chat_openai.py"), "--demo", "--port", str(port),
                             "--max_context", "64", "--max_new_tokens", "8", "--queue_size", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, ready = [], threading.Event()

    def pump():
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Serving"):
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        proc.wait(30)
        raise AssertionError("demo server did not start:\n" + "".join(output))
    try:
        yield {"url": f"http://127.0.0.1:{port}", "deadline": time.monotonic() + FUZZ_BUDGET_S, "warned": False}
    finally:
        proc.terminate()   # SIGTERM: the graceful stop, which must end in exit status 0
        try:
            status = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait(30)
    assert status == 0, "".join(output[-30:])
    assert "Traceback" not in "".join(output), "".join(output)


@pytest.fixture(scope="module")
def api_schema(demo):
    return schemathesis.openapi.from_url(demo["url"] + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@seed(FUZZ_SEED)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_demo_server_answers_every_request_as_documented(case, demo):
    if time.monotonic() > demo["deadline"]:
        if not demo["warned"]:
            demo["warned"] = True
            warnings.warn(f"schema fuzz: time budget of {FUZZ_BUDGET_S} s spent; the remaining cases were not sent")
        return
    started = time.monotonic()
    case.call_and_validate(base_url=demo["url"], timeout=REQUEST_TIMEOUT_S, checks=CHECKS)
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
