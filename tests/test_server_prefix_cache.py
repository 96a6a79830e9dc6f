"""The server reuses the KV cache across a chat's turns and says so: OpenAI's
usage.prompt_tokens_details.cached_tokens, Ollama's prompt_eval_count (tokens evaluated), with the
same answer as a server without the cache. Real `openai` and `ollama` clients, the real tiny model."""

import ollama
import openai
import pytest

from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer

SYSTEM = {"role": "system", "content": "You answer arithmetic questions in a few words. " * 8}


@pytest.fixture(scope="module")
def servers(tiny_model):
    """Two servers on two loads of the same model: prefix cache on (default) and off."""
    path = tiny_model()  # F32: random weights leave near-ties that quantized rounding would flip
    urls = []
    with BackgroundServer(create_app(Engine(model_generate_fn(load_model(path / "model.gguf", path, max_context=512)), 2),
                                     ServerSettings(model_name="tiny", max_new_tokens=8))) as cached, \
         BackgroundServer(create_app(Engine(model_generate_fn(load_model(path / "model.gguf", path, max_context=512),
                                                              cache_tokens=0), 2),
                                     ServerSettings(model_name="tiny", max_new_tokens=8))) as cold:
        urls = {"cached": cached, "cold": cold}
        yield urls


def openai_turns(base, stream):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    messages, replies = [SYSTEM], []
    for question in ("What is 2 + 2?", "And 3 * 5?", "And 10 - 4?"):
        messages.append({"role": "user", "content": question})
        kwargs = dict(model="tiny", messages=messages, temperature=0, max_tokens=8)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            reply = client.chat.completions.create(**kwargs)
            text, usage = reply.choices[0].message.content, reply.usage
        replies.append((text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": text})
    return replies


@pytest.mark.parametrize("stream", [False, True])
def test_openai_turns_report_cached_tokens_and_answer_as_without_the_cache(servers, stream):
    cached, cold = openai_turns(servers["cached"], stream), openai_turns(servers["cold"], stream)
    assert [(text, prompt) for text, prompt, _ in cached] == [(text, prompt) for text, prompt, _ in cold]
    assert all(hits == 0 for _, _, hits in cold)
    assert all(0 < hits < prompt for _, prompt, hits in cached[1:])  # later turns reuse the history
    assert cached[2][2] > cached[1][2]                               # ... and it grows with the chat


def ollama_turns(base):
    client = ollama.Client(host=base)
    messages, counts = [SYSTEM, {"role": "user", "content": "What is 6 + 1?"}], []
    for follow_up in ("Why?", "Sure?"):
        reply = client.chat(model="tiny", messages=messages, options={"temperature": 0, "num_predict": 4})
        counts.append(reply.prompt_eval_count)
        messages += [{"role": "assistant", "content": reply.message.content}, {"role": "user", "content": follow_up}]
    return counts


def test_ollama_counts_only_the_evaluated_prompt_tokens(servers):
    cached, cold = ollama_turns(servers["cached"]), ollama_turns(servers["cold"])
    assert cold[1] > cold[0]              # the whole growing prompt, every turn
    assert 0 < cached[1] < cold[1] // 2  # most of the second prompt was cached
