"""A request that names no token limit may fill the context window (OpenAI and Ollama have no default cap;
R1 often reasons past 1,000 tokens), unless the operator sets --max_new_tokens. Real `openai` and `ollama`
clients; the real backend (tokenizer, template, prefill_and_generate) around a model that never stops
(OneTokenModel)."""

import ollama
import openai
import pytest
from transformers import AutoTokenizer, GenerationConfig

from chat_openai import parse_args
from ktransformers.models.loader import LoadedModel
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import OneTokenModel
from ktransformers.server.wsgi import BackgroundServer

CONTEXT = 1300   # more than the 1,000 tokens the server used to stop at


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = OneTokenModel(tokenizer.encode("a", add_special_tokens=False)[0], len(tokenizer), CONTEXT)
    return LoadedModel(model, tokenizer, None, GenerationConfig.from_pretrained(tiny_model_dir))


def serve(loaded, **settings):
    return BackgroundServer(create_app(Engine(model_generate_fn(loaded, cache_tokens=0), queue_size=2),
                                       ServerSettings(model_name="m", max_context=CONTEXT, **settings)))


def test_a_request_without_a_limit_fills_the_context(loaded):
    with serve(loaded) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        usage = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}]).usage
        assert usage.prompt_tokens + usage.completion_tokens == CONTEXT
        chunks = list(client.completions.create(model="m", prompt="go on", stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens == CONTEXT
        for options in (None, {"num_predict": -1}):   # absent, or Ollama's "no limit"
            reply = ollama.Client(host=url, timeout=60).chat(model="m", messages=[{"role": "user", "content": "go"}],
                                                              options=options)
            assert reply.prompt_eval_count + reply.eval_count == CONTEXT and reply.done_reason == "length"
        assert ollama.Client(host=url).show("m").parameters.endswith("num_predict -1")


def test_the_operator_cap_and_the_request_limit_still_apply(loaded):
    with serve(loaded, max_new_tokens=7) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "go"}]
        assert client.chat.completions.create(model="m", messages=messages).usage.completion_tokens == 7
        assert client.chat.completions.create(model="m", messages=messages, max_tokens=3).usage.completion_tokens == 3
        assert ollama.Client(host=url).chat(model="m", messages=messages, options={"num_predict": 5}).eval_count == 5
        assert ollama.Client(host=url).chat(model="m", messages=messages).eval_count == 7


def test_cli_has_no_cap_unless_given():
    assert parse_args(["--demo"]).max_new_tokens is None
    assert parse_args(["--demo", "--max_new_tokens", "2048"]).max_new_tokens == 2048
