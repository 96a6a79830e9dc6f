"""logprobs over HTTP: the real `openai` SDK (chat `logprobs`/`top_logprobs`, legacy completions `logprobs: n`)
and the real `ollama` client (`logprobs`, `top_logprobs`) read a server around the real tiny model; the values
must equal an independent teacher-forced forward pass over prompt + answer (the answer's ids from calling
prefill_and_generate directly with the same sampling). The random model splits characters over tokens,
so the detokenizer holds text back while every token still gets its entry."""

import json

import ollama
import openai
import pytest
import requests
import torch

from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.text_stream import control_token_ids
from ktransformers.util.utils import prefill_and_generate

MESSAGES = [{"role": "user", "content": "Tell me a story"}]
TOKENS = 30


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir / "model.gguf", model_path=tiny_model_dir, max_context=96)


@pytest.fixture(scope="module")
def url(loaded):
    engine = Engine(model_generate_fn(loaded, cache_tokens=0), queue_size=2)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="tiny", max_context=96))) as base:
        yield base
    engine.stop()


def oracle(loaded, prompt_ids, **sampling):
    """(answer ids, their teacher-forced log-probabilities, the visible text) for the request's sampling."""
    params = SamplingParams.from_generation_config(loaded.generation_config, **sampling)
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, prompt_ids, TOKENS, sampling=params))
    ids = [e.token_id for e in events if not isinstance(e, FinishEvent) and e.token_id is not None]
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + ids]), 0)[0, len(prompt_ids) - 1:-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return ids, logprobs[torch.arange(len(ids)), ids].tolist(), logprobs


def token_bytes(loaded, ids):
    hidden = control_token_ids(loaded.tokenizer)
    return [loaded.tokenizer.decode([i], skip_special_tokens=False) if i in hidden else None for i in ids]


def test_openai_chat_logprobs_match_teacher_forcing(url, loaded):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=TOKENS, temperature=0, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kwargs)
    ids, want, rows = oracle(loaded, build_prompt_ids(loaded.tokenizer, MESSAGES), temperature=0)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == len(ids) == TOKENS
    assert [e.logprob for e in entries] == pytest.approx(want, abs=1e-4)
    assert sum(e.logprob for e in entries) == pytest.approx(sum(want), abs=1e-3)
    for entry, row in zip(entries, rows):
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].bytes == entry.bytes        # greedy: the chosen token is the best one

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [(e.token, e.logprob, e.bytes) for e in entries]
    text = "".join((c.choices[0].delta.content or "") + (c.choices[0].delta.model_extra.get("reasoning_content") or "")
                   for c in chunks if c.choices)
    hidden = set(control_token_ids(loaded.tokenizer))
    shown = b"".join(bytes(e.bytes) for e, i in zip(streamed, ids) if i not in hidden)
    assert shown.decode("utf-8", errors="replace") == text
    for c in chunks:     # a chunk reports the tokens whose text it sends, so none reports without text
        if c.choices and c.choices[0].logprobs:
            delta = c.choices[0].delta
            assert delta.content or delta.model_extra.get("reasoning_content") or c.choices[0].finish_reason


def test_legacy_completions_logprobs(url, loaded):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    prompt = "Once upon a time"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=TOKENS, temperature=0, logprobs=2)
    _, want, _ = oracle(loaded, loaded.tokenizer.encode(prompt, add_special_tokens=True), temperature=0)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert len(logprobs.tokens) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == TOKENS
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[-1] <= len(reply.choices[0].text)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == logprobs.token_logprobs
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_logprobs_of_a_sampled_reply(url, loaded, stream):
    """Sampled at temperature 1.3 with a seed: the reported values are still the model's raw ones."""
    client = ollama.Client(host=url, timeout=30)
    options = {"num_predict": TOKENS, "temperature": 1.3, "seed": 11}
    reply = client.chat(model="tiny", messages=MESSAGES, options=options, logprobs=True, top_logprobs=2, stream=stream)
    entries = [e for part in reply for e in (part.logprobs or [])] if stream else reply.logprobs
    _, want, _ = oracle(loaded, build_prompt_ids(loaded.tokenizer, MESSAGES), temperature=1.3, seed=11)
    assert [e.logprob for e in entries] == pytest.approx(want, abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    generated = client.generate(model="tiny", prompt="Tell me a story", options=options, logprobs=True)
    assert len(generated.logprobs) == generated.eval_count and generated.logprobs[0].top_logprobs == []


def test_without_logprobs_nothing_is_sent(url):
    reply = requests.post(url + "/v1/chat/completions", timeout=30,
                          json={"messages": MESSAGES, "max_tokens": 3}).json()
    assert reply["choices"][0]["logprobs"] is None
    lines = requests.post(url + "/api/chat", timeout=30, json={"model": "tiny", "messages": MESSAGES,
                                                               "options": {"num_predict": 3}}).text.splitlines()
    assert not any("logprobs" in json.loads(line) for line in lines)


@pytest.mark.parametrize("body, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
])
def test_bad_logprobs_requests_are_400_naming_the_field(url, body, param):
    r = requests.post(url + "/v1/chat/completions", timeout=30, json={"messages": MESSAGES, "max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = requests.post(url + "/api/chat", timeout=30, json={"model": "tiny", "messages": MESSAGES, **body})
    assert r.status_code == 400 and param in r.json()["error"]
