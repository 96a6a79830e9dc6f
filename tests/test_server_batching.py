"""Concurrent chats through the server decode together (continuous batching) and never mix: each
stream, greedy or seeded, equals the same request served alone, token for token; a client that
leaves mid-stream frees its slot while the others go on. The shipped demo model answers arithmetic,
so every stream has its own known answer; the real `openai` SDK is the client."""

from __future__ import annotations

import threading

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ktransformers import kernels
from ktransformers.demo import demo_paths
from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")

# (question, sampling): distinct prompts, greedy and seeded
STREAMS = [("What is 4821 plus 367?", {"temperature": 0}),
           ("What is 905 minus 78?", {"temperature": 0}),
           ("What is 63 times 7?", {"temperature": 0.8, "seed": 11}),
           ("What is 1200 plus 999?", {"temperature": 0.8, "seed": 12})]


@pytest.fixture(scope="module")
def servers():
    """The demo model served twice: with 4 cache slots (batched; a newcomer's prompt goes 2 tokens a
    step while others stream) and with 1 (each request alone)."""
    model_dir, gguf = demo_paths()
    urls, engines = [], []
    try:
        with BackgroundServer(app_for(model_dir, gguf, 4, engines, prefill_slice=2)) as batched, \
                BackgroundServer(app_for(model_dir, gguf, 1, engines)) as alone:
            yield batched, alone, engines[0]
    finally:
        for engine in engines:
            engine.stop()


def app_for(model_dir, gguf, max_batch, engines, prefill_slice=None):
    loaded = load_model(gguf, model_dir, max_context=1024, max_batch=max_batch)
    engine = Engine(model_generate_fn(loaded), queue_size=8, max_batch=max_batch, prefill_slice=prefill_slice)
    engines.append(engine)
    return create_app(engine, ServerSettings(model_name="demo", max_context=1024))


def stream(url: str, question: str, sampling: dict, stop_after: int | None = None) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    text, chunks = [], client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": question}], stream=True, max_tokens=400, **sampling)
    for i, chunk in enumerate(chunks):
        if chunk.choices:
            delta = chunk.choices[0].delta
            text.append((delta.model_extra.get("reasoning_content") or "") + (delta.content or ""))
        if stop_after is not None and i >= stop_after:
            chunks.close()  # the client leaves mid-stream
            break
    return "".join(text)


def run_together(url: str, streams, stop_after=None) -> list[str]:
    results, start = [None] * len(streams), threading.Barrier(len(streams))

    def one(i, question, sampling):
        start.wait()
        results[i] = stream(url, question, sampling, stop_after if i == 0 else None)

    threads = [threading.Thread(target=one, args=(i, q, s)) for i, (q, s) in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_concurrent_streams_decode_together_and_each_equals_its_solo_run(servers):
    batched, alone, engine = servers
    solo = [stream(alone, q, s) for q, s in STREAMS]
    assert "5188" in solo[0] and "827" in solo[1] and "441" in solo[2]  # the demo model knows its sums
    together = run_together(batched, STREAMS)
    assert together == solo
    assert max(engine.decode_batch_sizes) >= 3  # the streams did share decode passes
    health = requests.get(batched + "/health", timeout=5).json()
    assert (health["max_batch"], health["running"], health["busy"]) == (4, 0, False)
    metrics = {(s.name, tuple(s.labels.items())): s.value for family in
               text_string_to_metric_families(requests.get(batched + "/metrics", timeout=5).text) for s in family.samples}
    shared = sum(v for (name, labels), v in metrics.items()
                 if name == "ktransformers_decode_passes_total" and int(dict(labels)["sequences"]) >= 3)
    assert shared == sum(n for size, n in engine.decode_batch_sizes.items() if size >= 3) > 0


def test_a_client_leaving_mid_stream_frees_its_slot_and_the_others_go_on(servers):
    batched, alone, engine = servers
    solo = [stream(alone, q, s) for q, s in STREAMS[1:]]
    together = run_together(batched, STREAMS, stop_after=3)
    assert together[1:] == solo
    assert len(together[0]) < len(stream(alone, *STREAMS[0]))
    health = requests.get(batched + "/health", timeout=5).json()
    assert (health["running"], health["busy"]) == (0, False)


def test_a_newcomer_prefilled_in_slices_while_others_stream_answers_as_alone(servers):
    """The later streams join while the first is decoding: their prompts go in 2-token slices
    between its steps, and every answer still equals its solo run."""
    batched, alone, engine = servers
    solo = [stream(alone, q, s) for q, s in STREAMS]
    results, first_streaming = [None] * len(STREAMS), threading.Event()

    def first():
        client = openai.OpenAI(base_url=batched + "/v1", api_key="none", max_retries=0, timeout=120)
        text, (question, sampling) = [], STREAMS[0]
        for chunk in client.chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                    stream=True, max_tokens=400, **sampling):
            if chunk.choices:
                delta = chunk.choices[0].delta
                text.append((delta.model_extra.get("reasoning_content") or "") + (delta.content or ""))
                first_streaming.set()
        results[0] = "".join(text)

    def later(i):
        first_streaming.wait(60)
        results[i] = stream(batched, *STREAMS[i])

    threads = [threading.Thread(target=first)] + [threading.Thread(target=later, args=(i,)) for i in range(1, len(STREAMS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == solo
