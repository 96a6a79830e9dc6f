"""llama.cpp-style `timings` for AnythingLLM's Generic OpenAI provider, which takes its token counts and
speed from the chunk carrying finish_reason and stops reading there. The real `openai` SDK reads a server
around the real tiny model, with the prefix cache on (so cache_n shows on a second turn)."""

import math

import openai
import pytest

from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer

SYSTEM = {"role": "system", "content": "You are terse. " * 10}


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    loaded = load_model(tiny_model_dir / "model.gguf", model_path=tiny_model_dir, max_context=256)
    engine = Engine(model_generate_fn(loaded), queue_size=2)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="tiny", max_context=256))) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    engine.stop()


def read_like_anythingllm(stream):
    """Text until the chunk with finish_reason, whose timings are taken; nothing after it is read."""
    text = []
    for chunk in stream:
        choice = chunk.choices[0]
        text.append(choice.delta.content or choice.delta.model_extra.get("reasoning_content") or "")
        if choice.finish_reason:
            stream.close()
            return "".join(text), chunk.model_extra["timings"]
    raise AssertionError("no chunk carried finish_reason")


def check_consistent(timings, prompt_tokens, completion_tokens):
    assert timings["prompt_n"] + timings["cache_n"] == prompt_tokens
    assert timings["predicted_n"] == completion_tokens
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0
    assert math.isclose(timings["prompt_per_second"], timings["prompt_n"] / timings["prompt_ms"] * 1000, rel_tol=1e-6)
    # the first token comes with the prefill: the decode rate is over the steps after it
    steps = completion_tokens - 1
    assert math.isclose(timings["predicted_per_second"], steps / timings["predicted_ms"] * 1000, rel_tol=1e-6)
    assert math.isclose(timings["predicted_per_token_ms"] * timings["predicted_per_second"], 1000, rel_tol=1e-6)
    assert math.isclose(timings["prompt_per_token_ms"] * timings["prompt_n"], timings["prompt_ms"], rel_tol=1e-6)


def test_the_finishing_chunk_carries_timings_that_agree_with_usage(client):
    messages = [SYSTEM, {"role": "user", "content": "Tell me a story"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    check_consistent(reply.model_extra["timings"], reply.usage.prompt_tokens, reply.usage.completion_tokens)
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    _, timings = read_like_anythingllm(streamed)
    check_consistent(timings, reply.usage.prompt_tokens, 6)
    assert timings["cache_n"] > 0     # the same conversation again: its prompt came from the prefix cache


def test_usage_stays_in_its_own_last_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Hi"}]))
    assert [c.usage is not None for c in chunks].count(True) == 1 and chunks[-1].choices == []
    assert [c.model_extra.get("timings") is not None for c in chunks].count(True) == 1
    check_consistent(chunks[-2].model_extra["timings"], chunks[-1].usage.prompt_tokens, 4)


def test_completions_carry_timings_too(client):
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    check_consistent(reply.model_extra["timings"], reply.usage.prompt_tokens, 5)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    check_consistent(chunks[-1].model_extra["timings"], reply.usage.prompt_tokens, 5)
