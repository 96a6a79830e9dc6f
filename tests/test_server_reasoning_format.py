"""`reasoning_format` in the request body: ours (deepseek, think_tags) and llama.cpp's values, which Dify's
OpenAI-API-compatible plugin sends (none, auto, deepseek, deepseek-legacy), with llama.cpp's meanings.
The real `openai` SDK reads the replies; the scripted model thinks `hmm0 hmm1 ` then answers `<tag>.0 ...`."""

import openai
import pytest

from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server

THOUGHT, ANSWER = "hmm0 hmm1 ", "emu.0 emu.1 "
INLINE = f"<think>{THOUGHT}</think>{ANSWER}"
# value -> (reasoning_content, content); None: the field is absent
EXPECTED = {
    "deepseek": (THOUGHT, ANSWER),
    "auto": (THOUGHT, ANSWER),
    "think_tags": (None, INLINE),
    "none": (None, INLINE),
    "deepseek-legacy": (THOUGHT, INLINE),
}


@pytest.fixture(scope="module")
def client():
    with scripted_server(settings=ServerSettings(model_name="m", max_new_tokens=4)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=10)


def ask(client, value, **kwargs):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "emu"}],
                                          extra_body={"reasoning_format": value}, **kwargs)


@pytest.mark.parametrize("value", list(EXPECTED))
def test_each_value_shapes_the_reply_as_llama_cpp_does(client, value):
    message = ask(client, value).choices[0].message
    assert (message.model_extra.get("reasoning_content"), message.content) == EXPECTED[value]
    chunks = list(ask(client, value, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra.get("reasoning_content")]
    content = "".join(d.content or "" for d in deltas)
    assert ("".join(reasoning) if reasoning else None, content) == EXPECTED[value]


def test_an_unknown_value_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as exc:
        ask(client, "deepseek-v4")
    assert exc.value.body["param"] == "reasoning_format" and "deepseek-legacy" in exc.value.body["message"]


@pytest.mark.parametrize("value", ["none", "deepseek-legacy", "auto"])
def test_the_server_wide_option_takes_the_same_values(value):
    with scripted_server(settings=ServerSettings(model_name="m", max_new_tokens=4, reasoning_format=value)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=10)
        message = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "emu"}]
                                                 ).choices[0].message
    assert (message.model_extra.get("reasoning_content"), message.content) == EXPECTED[value]
