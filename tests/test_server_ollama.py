"""The Ollama surface, driven over HTTP by the real `ollama` Python client and raw requests."""

import json
from datetime import datetime

import ollama
import pytest
import requests

from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server

API_KEY = "ollama-key"


@pytest.fixture(scope="module")
def srv():
    settings = ServerSettings(model_name="tiny-r1", api_key=API_KEY, max_new_tokens=4, max_context=200)
    with scripted_server(settings=settings) as server:
        yield server


@pytest.fixture
def client(srv):
    return ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)


def test_chat_non_stream(client, srv):
    reply = client.chat(model="tiny-r1", messages=[{"role": "system", "content": "sys"},
                                                   {"role": "user", "content": "hello fox"}],
                        options={"num_predict": 4, "temperature": 0.2, "top_k": 3, "repeat_penalty": 1.1,
                                 "stop": ["zz"], "seed": 1})
    assert reply.done and reply.done_reason == "length"
    assert reply.message.role == "assistant" and reply.message.content == "fox.0 fox.1 "
    assert reply.message.thinking == "hmm0 hmm1 "
    assert (reply.prompt_eval_count, reply.eval_count) == (3, 4)
    assert reply.prompt_eval_duration == 1_000_000                  # 0.001 s in nanoseconds
    assert isinstance(reply.eval_duration, int) and reply.total_duration >= reply.eval_duration
    datetime.fromisoformat(reply.created_at.replace("Z", "+00:00"))
    seen = srv.generator.requests[-1]
    assert seen.sampling == {"temperature": 0.2, "top_k": 3, "seed": 1, "repetition_penalty": 1.1}
    assert seen.stop == ["zz"] and seen.messages[0] == {"role": "system", "content": "sys"}


def test_chat_stream(client):
    parts = list(client.chat(model="tiny-r1", messages=[{"role": "user", "content": "owl"}], stream=True))
    assert [p.done for p in parts] == [False] * 4 + [True]
    assert "".join(p.message.thinking or "" for p in parts) == "hmm0 hmm1 "
    assert "".join(p.message.content or "" for p in parts) == "owl.0 owl.1 "   # server default: 4 tokens
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 4


def test_think_false_inlines_reasoning(client):
    reply = client.chat(model="tiny-r1:latest", messages=[{"role": "user", "content": "bee"}], think=False)
    assert reply.message.content == "<think>hmm0 hmm1 </think>bee.0 bee.1 " and not reply.message.thinking


def test_generate_stream_and_not(client, srv):
    reply = client.generate(model="tiny-r1", prompt="why elk", system="be kind")
    assert reply.response == "elk.0 elk.1 " and reply.thinking == "hmm0 hmm1 " and reply.done
    assert srv.generator.requests[-1].messages == [{"role": "system", "content": "be kind"},
                                                   {"role": "user", "content": "why elk"}]
    parts = list(client.generate(model="tiny-r1", prompt="raw emu", raw=True, stream=True, options={"num_predict": 3}))
    assert "".join(p.response for p in parts) == "emu.0 "
    assert srv.generator.requests[-1].prompt == "raw emu" and srv.generator.requests[-1].messages is None
    assert parts[-1].done and parts[-1].eval_count == 3


def test_raw_ndjson_wire_format(srv):
    r = requests.post(srv.url + "/api/chat", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5,
                      json={"model": "tiny-r1", "messages": [{"role": "user", "content": "yak"}]})
    assert r.headers["Content-Type"].startswith("application/x-ndjson")   # stream is Ollama's default
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert all(set(line) >= {"model", "created_at", "message", "done"} for line in lines)
    final = lines[-1]
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(final[key], int), key


def test_any_model_name_is_served_and_the_served_name_echoed(client):
    """Open-WebUI, AnythingLLM and Dify send whatever model name the user typed."""
    reply = client.chat(model="llama3", messages=[{"role": "user", "content": "ant"}], options={"num_predict": 3})
    assert reply.model == "tiny-r1" and reply.message.content == "ant.0 "
    parts = list(client.chat(model="deepseek-r1:671b", messages=[{"role": "user", "content": "ant"}], stream=True))
    assert {p.model for p in parts} == {"tiny-r1"} and parts[-1].done
    generated = client.generate(model="qwen", prompt="why elk")
    assert generated.model == "tiny-r1" and generated.response == "elk.0 elk.1 "
    assert list(client.generate(model="qwen", stream=True))[-1].model == "tiny-r1"   # a load request
    assert client.show("anything").details.format == "gguf"
    assert [m.model for m in client.list().models] == ["tiny-r1"]


def test_model_listing_routes(client, srv):
    assert [m.model for m in client.list().models] == ["tiny-r1"]
    shown = client.show("tiny-r1")
    assert shown.details.format == "gguf" and "thinking" in shown.capabilities
    assert shown.modelinfo["deepseek2.context_length"] == 200
    assert [m.model for m in client.ps().models] == ["tiny-r1"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert requests.get(srv.url + "/api/version", headers=headers, timeout=5).json()["version"]
    assert requests.post(srv.url + "/api/show", json={"name": "tiny-r1"}, headers=headers, timeout=5).status_code == 200


def test_ollama_probe_is_open_and_other_routes_need_the_key(srv):
    assert requests.get(srv.url + "/", timeout=5).text == "Ollama is running"
    assert requests.head(srv.url + "/", timeout=5).status_code == 200
    r = requests.get(srv.url + "/api/tags", timeout=5)
    assert r.status_code == 401 and "API key" in r.json()["error"]


def test_errors_use_ollama_shape(client, srv):
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="tiny-r1", messages=[{"role": "user", "content": "w " * 250}])
    assert exc.value.status_code == 400 and "context window" in exc.value.error
    r = requests.post(srv.url + "/api/chat", data="{oops", timeout=5,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "Malformed JSON" in r.json()["error"]
    r = requests.post(srv.url + "/api/generate", json={"model": "tiny-r1", "prompt": 5},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert r.status_code == 400 and "prompt" in r.json()["error"]


def test_empty_request_is_a_load_request(srv):
    r = requests.post(srv.url + "/api/generate", json={"model": "tiny-r1"},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).json()
    assert r["done"] is True and r["done_reason"] == "load"


@pytest.mark.parametrize("route", ["chat", "generate"])
def test_think_tags_reply_cut_short_closes_the_tag_before_done(route):
    """AnythingLLM stops reading at done=true: the </think> closing a reply cut by num_predict must come
    on a done=false line, and the done=true line carries no text (as Ollama's own)."""
    with scripted_server(settings=ServerSettings(model_name="m", reasoning_format="think_tags")) as srv:
        client = ollama.Client(host=srv.url, timeout=10)
        if route == "chat":
            parts = list(client.chat(model="m", messages=[{"role": "user", "content": "owl"}], stream=True,
                                     options={"num_predict": 1}))
            texts = [p.message.content for p in parts]
        else:
            parts = list(client.generate(model="m", prompt="owl", stream=True, options={"num_predict": 1}))
            texts = [p.response for p in parts]
    assert parts[-1].done and parts[-1].done_reason == "length" and texts[-1] == ""
    assert all(not p.done for p in parts[:-1])
    assert "".join(texts[:-1]) == "<think>hmm0 </think>"      # everything before done=true
