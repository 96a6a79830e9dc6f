"""The OpenAI surface, driven over HTTP by the real `openai` SDK and raw requests.

The ScriptedGenerator answers `hmm0 hmm1 ` as reasoning, then `<tag>.0 <tag>.1 ...` where
<tag> is the last word of the last message.
"""

import json

import openai
import pytest
import requests
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import validate as validate_openapi

from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server

API_KEY = "sk-test-123"


@pytest.fixture(scope="module")
def srv():
    with scripted_server(settings=ServerSettings(model_name="tiny-r1", api_key=API_KEY, max_new_tokens=5)) as server:
        yield server


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)


def post(srv, path, body=None, data=None, key=API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Content-Type"] = "application/json"
    return requests.post(srv.url + path, json=body, data=data, headers=headers, timeout=10, **kwargs)


def sse_payloads(response) -> list:
    """Every `data:` line of an SSE body: parsed JSON, or the literal [DONE]."""
    out = []
    for block in response.text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def test_sdk_non_stream_chat_has_reasoning_content_and_usage(client, srv):
    reply = client.chat.completions.create(
        model="tiny-r1", max_tokens=4,
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "first"},
                  {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": [{"type": "text", "text": "say "}, {"type": "text", "text": "zebra"}]}])
    assert reply.object == "chat.completion" and reply.model == "tiny-r1"
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content == "zebra.0 zebra.1 "
    assert message.model_extra["reasoning_content"] == "hmm0 hmm1 "
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 4, 10)
    seen = srv.generator.requests[-1]
    assert seen.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                             {"role": "assistant", "content": "ok"}, {"role": "user", "content": "say zebra"}]


def test_sdk_stream_chat_chunks_follow_the_schema(client):
    stream = client.chat.completions.create(
        model="tiny-r1", max_completion_tokens=4, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hello lion"}])
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("hmm0 hmm1 ", "lion.0 lion.1 ")
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_raw_sse_stream_is_exact(srv):
    r = post(srv, "/v1/chat/completions", {"model": "tiny-r1", "stream": True, "max_tokens": 3,
                                            "messages": [{"role": "user", "content": "x"}]})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    for p in payloads[:-1]:
        ChatCompletionChunk.model_validate(p)          # the SDK's own schema as the oracle
        finishing = {"timings"} if p["choices"][0]["finish_reason"] else set()   # llama.cpp's, for AnythingLLM
        assert set(p) == {"id", "object", "created", "model", "choices"} | finishing
        assert set(p["choices"][0]) == {"index", "delta", "finish_reason", "logprobs"}
        assert p["choices"][0]["logprobs"] is None
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert len(payloads) == 6   # role, 3 tokens, finish, [DONE]
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-2]] == [None] * 4


def test_think_tags_override_inlines_reasoning(srv):
    body = {"model": "tiny-r1", "max_tokens": 4, "reasoning_format": "think_tags",
            "messages": [{"role": "user", "content": "cat"}]}
    reply = post(srv, "/v1/chat/completions", body).json()
    ChatCompletion.model_validate(reply)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "<think>hmm0 hmm1 </think>cat.0 cat.1 "}
    streamed = sse_payloads(post(srv, "/v1/chat/completions", {**body, "stream": True}))
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in streamed[:-1])
    assert text == "<think>hmm0 hmm1 </think>cat.0 cat.1 "
    assert not any("reasoning_content" in p["choices"][0]["delta"] for p in streamed[:-1])
    cut = post(srv, "/v1/chat/completions", {**body, "max_tokens": 1}).json()  # stopped mid-thought
    assert cut["choices"][0]["message"]["content"] == "<think>hmm0 </think>"


def test_request_parameters_reach_the_generator(client, srv):
    client.chat.completions.create(model="tiny-r1", messages=[{"role": "developer", "content": "d"}, {"role": "user", "content": "q"}],
                                   temperature=0.3, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=-0.5,
                                   stop="END", extra_body={"top_k": 5, "some_unknown_field": 1})
    seen = srv.generator.requests[-1]
    assert seen.sampling == {"temperature": 0.3, "top_p": 0.9, "top_k": 5, "seed": 7,
                             "presence_penalty": 0.5, "frequency_penalty": -0.5}
    assert seen.stop == ["END"] and seen.max_new_tokens == 5   # the server default
    assert seen.messages[0] == {"role": "system", "content": "d"}
    client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "q"}], stop=["a", "b"])
    assert srv.generator.requests[-1].stop == ["a", "b"]


def test_stop_string_finish_reason(client):
    reply = client.chat.completions.create(model="tiny-r1", max_tokens=50, stop=["ant.1"],
                                           messages=[{"role": "user", "content": "ant"}])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "ant.0 ant.1 "


def test_completions_stream_and_not(client):
    reply = client.completions.create(model="tiny-r1", prompt="once upon owl", max_tokens=3)
    assert isinstance(reply, Completion) and reply.object == "text_completion"
    assert reply.choices[0].text == "<think>hmm0 hmm1 owl.0 " and reply.usage.completion_tokens == 3
    chunks = list(client.completions.create(model="tiny-r1", prompt="owl", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "<think>hmm0 hmm1 owl.0 "
    assert chunks[-1].choices[0].finish_reason == "length"


def test_any_model_name_is_served_and_the_served_name_echoed(client, srv):
    """Chat clients send whatever model name the user typed (or none)."""
    for name in ("gpt-4o", "deepseek-r1:671b", "TINY-R1"):
        reply = client.chat.completions.create(model=name, max_tokens=3, messages=[{"role": "user", "content": "yak"}])
        assert reply.model == "tiny-r1" and reply.choices[0].message.content == "yak.0 "
    stream = client.chat.completions.create(model="my-model", max_tokens=3, stream=True,
                                            messages=[{"role": "user", "content": "gnu"}])
    assert {chunk.model for chunk in stream} == {"tiny-r1"}
    completion = client.completions.create(model="text-davinci-003", prompt="owl", max_tokens=2)
    assert completion.model == "tiny-r1" and completion.choices[0].text == "<think>hmm0 hmm1 "
    unnamed = post(srv, "/v1/chat/completions", {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert unnamed.status_code == 200 and unnamed.json()["model"] == "tiny-r1"
    assert [m.id for m in client.models.list().data] == ["tiny-r1"]   # the listing names the served model


def test_models_routes(client, srv):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-r1"]
    assert client.models.retrieve("tiny-r1").id == "tiny-r1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("body, data, param", [
    (None, "{not json", None),
    (None, "", None),
    ({"messages": "hi"}, None, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, None, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, None, "temperature"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None, "messages.0.role"),
    ({"messages": []}, None, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     None, "messages.0.content.0.type"),
])
def test_malformed_requests_are_400_with_openai_error_body(srv, body, data, param):
    r = post(srv, "/v1/chat/completions", body, data=data)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if param:
        assert error["param"] == param


def test_sdk_raises_the_right_errors(client, srv):
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 1"):
        client.chat.completions.create(model="tiny-r1", n=2, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "w " * 300}])
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="top_p"):   # a value the sampler rejects
        client.chat.completions.create(model="tiny-r1", top_p=0, messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_oversized_prompt_is_rejected_before_streaming(srv):
    r = post(srv, "/v1/chat/completions", {"stream": True, "messages": [{"role": "user", "content": "w " * 300}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "300" in r.json()["error"]["message"]


def test_auth_scope_and_unknown_route(srv):
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200       # open
    assert requests.get(srv.url + "/v1/models", timeout=5).status_code == 401    # no key
    r = requests.get(srv.url + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = requests.get(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert r.status_code == 405 and "POST" in r.headers["Allow"] and r.json()["error"]["message"]


def test_cors_preflight_and_headers_for_the_named_origins_only():
    settings = ServerSettings(model_name="m", cors_origins=("http://localhost:3000",))
    with scripted_server(settings=settings) as server:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        r = requests.options(server.url + "/v1/chat/completions", timeout=5,
                             headers={"Origin": "http://localhost:3000", **preflight})
        assert r.status_code == 200
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
        r = requests.options(server.url + "/v1/chat/completions", timeout=5,
                             headers={"Origin": "http://evil.example", **preflight})
        assert "Access-Control-Allow-Origin" not in r.headers


def test_openapi_document_is_valid(srv):
    doc = requests.get(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).json()
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.")
    chat_schema = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat_schema == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "max_completion_tokens" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_real_responses_match_the_documented_schemas(srv):
    doc = requests.get(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).json()

    def check(instance, name):
        Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]}).validate(instance)

    chat = {"model": "tiny-r1", "max_tokens": 3, "messages": [{"role": "user", "content": "doc"}]}
    check(post(srv, "/v1/chat/completions", chat).json(), "ChatCompletion")
    for payload in sse_payloads(post(srv, "/v1/chat/completions", {**chat, "stream": True,
                                                                    "stream_options": {"include_usage": True}}))[:-1]:
        check(payload, "ChatCompletionChunk")
    for payload in sse_payloads(post(srv, "/v1/completions", {"prompt": "doc", "max_tokens": 2, "stream": True}))[:-1]:
        check(payload, "Completion")
    check(post(srv, "/v1/completions", {"prompt": "doc", "max_tokens": 2}).json(), "Completion")
    check(requests.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).json(),
          "ModelList")
    with pytest.raises(ValidationError):        # the schemas do constrain: a wrong object type fails
        check({**post(srv, "/v1/chat/completions", chat).json(), "object": "chat.completion.chunk"}, "ChatCompletion")


def test_server_wide_options_force_think_and_think_tags():
    settings = ServerSettings(model_name="m", force_think=True, reasoning_format="think_tags")
    with scripted_server(settings=settings) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=10)
        reply = client.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "gnu"}])
        assert server.generator.requests[-1].force_think is True
        assert reply.choices[0].message.content == "<think>hmm0 hmm1 </think>gnu.0 "
        assert "reasoning_content" not in reply.choices[0].message.model_extra
        ollama_reply = requests.post(server.url + "/api/chat", timeout=5, json={
            "model": "m", "stream": False, "options": {"num_predict": 3},
            "messages": [{"role": "user", "content": "gnu"}]}).json()
        assert ollama_reply["message"]["content"] == "<think>hmm0 hmm1 </think>gnu.0 "
        deepseek = client.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "gnu"}],
                                                  extra_body={"reasoning_format": "deepseek"})
        assert deepseek.choices[0].message.model_extra["reasoning_content"] == "hmm0 hmm1 "
