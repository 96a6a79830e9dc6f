"""Fields that would change the answer but are not implemented are refused with a 400 naming them; empty
values (which ask for nothing) and harmless fields pass. Sent the way clients send them: the real `openai`
SDK's own parameters, the `ollama` client, raw bodies. The list lives in one place (schemas.py), so
/openapi.json documents it."""

import ollama
import openai
import pytest
import requests

from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server

USER = [{"role": "user", "content": "owl"}]


@pytest.fixture(scope="module")
def srv():
    with scripted_server(settings=ServerSettings(model_name="m", max_new_tokens=3)) as server:
        yield server


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=10)


CHAT_REFUSED = [
    ("logit_bias", {"1234": -100}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "a draft"}),
    ("web_search_options", {}),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
]


@pytest.mark.parametrize("field, value", CHAT_REFUSED)
def test_chat_fields_that_change_the_answer_are_refused(client, srv, field, value):
    before = len(srv.generator.requests)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=USER, **{field: value})
    assert exc.value.body["param"] == field and "not supported" in exc.value.body["message"]
    assert len(srv.generator.requests) == before          # refused before anything ran


@pytest.mark.parametrize("field, value", [("logit_bias", {"50256": -100}), ("suffix", "}"), ("echo", True),
                                          ("best_of", 3)])
def test_completion_fields_that_change_the_answer_are_refused(client, field, value):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="m", prompt="def f():", **{field: value})
    assert exc.value.body["param"] == field


def test_empty_values_and_harmless_fields_pass(client, srv):
    reply = client.chat.completions.create(
        model="m", messages=USER, logit_bias={}, modalities=["text"], function_call="none", functions=[],
        user="u-1", metadata={"app": "x"}, store=False, parallel_tool_calls=True, service_tier="auto",
        reasoning_effort="high", stream_options=None, extra_body={"web_search_options": None})
    assert reply.choices[0].message.content == "owl.0 "
    completion = client.completions.create(model="m", prompt="owl", echo=False, suffix="", best_of=1, user="u")
    assert completion.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="m", messages=USER, stream=True,
                                                 stream_options={"include_usage": True, "continuous_usage_stats": False}))
    assert chunks[-1].usage.completion_tokens == 3


def test_min_p_reaches_the_sampler(client, srv):
    client.chat.completions.create(model="m", messages=USER, extra_body={"min_p": 0.05})
    assert srv.generator.requests[-1].sampling == {"min_p": 0.05}
    ollama.Client(host=srv.url).chat(model="m", messages=USER, options={"min_p": 0.1, "temperature": 0.5})
    assert srv.generator.requests[-1].sampling == {"min_p": 0.1, "temperature": 0.5}


@pytest.mark.parametrize("field, value", [("suffix", "return x"), ("template", "{{ .Prompt }}"), ("context", [1, 2, 3])])
def test_ollama_generate_refuses_what_it_cannot_honour(srv, field, value):
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=srv.url).generate(model="m", prompt="owl", **{field: value})
    assert exc.value.status_code == 400 and field in exc.value.error and "not supported" in exc.value.error


def test_the_openapi_document_lists_the_refused_fields(srv):
    schemas = requests.get(srv.url + "/openapi.json", timeout=5).json()["components"]["schemas"]
    for model, fields in [("ChatCompletionRequest", [f for f, _ in CHAT_REFUSED]),
                          ("CompletionRequest", ["logit_bias", "suffix", "echo", "best_of"]),
                          ("OllamaGenerateRequest", ["suffix", "template", "context"])]:
        properties = schemas[model]["properties"]
        for field in fields:
            assert field in properties, (model, field)
    assert properties["context"]["description"].startswith("Not supported")
