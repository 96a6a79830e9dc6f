"""LangChain's ChatOpenAI (langchain-openai) against a server around the real tiny model: the request shapes
it sends pass, its usage is counted once when it sums streamed chunks (timings ride on the finishing chunk,
usage on its own last one), a request without max_tokens may fill the context, and logprobs arrive."""

import openai
import pytest
from langchain_openai import ChatOpenAI

from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server
from ktransformers.server.wsgi import BackgroundServer

CONTEXT = 96
QUESTION = "Tell me a story"


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    loaded = load_model(tiny_model_dir / "model.gguf", model_path=tiny_model_dir, max_context=CONTEXT)
    engine = Engine(model_generate_fn(loaded, cache_tokens=0), queue_size=2)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="tiny", max_context=CONTEXT))) as base:
        yield base
    engine.stop()


def chat_model(url, **kwargs):
    return ChatOpenAI(base_url=url + "/v1", api_key="none", model="tiny", temperature=0, max_retries=0, **kwargs)


def test_invoke_and_summed_stream_agree_with_the_sdk(url):
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.create(
        model="tiny", temperature=0, max_tokens=8, messages=[{"role": "user", "content": QUESTION}])
    llm = chat_model(url, max_tokens=8, stream_usage=True)
    reply = llm.invoke(QUESTION)
    assert reply.content == sdk.choices[0].message.content
    usage = {"input_tokens": sdk.usage.prompt_tokens, "output_tokens": 8, "total_tokens": sdk.usage.total_tokens}
    assert {k: reply.usage_metadata[k] for k in usage} == usage
    total = None
    for chunk in llm.stream(QUESTION):       # LangChain adds chunks up, usage included
        total = chunk if total is None else total + chunk
    assert total.content == reply.content
    assert {k: total.usage_metadata[k] for k in usage} == usage      # counted once, not twice
    assert total.response_metadata["finish_reason"] == "length"


def test_no_max_tokens_lets_the_reply_fill_the_context(url):
    reply = chat_model(url).invoke(QUESTION)    # LangChain sends no max_tokens by default
    assert reply.usage_metadata["total_tokens"] == CONTEXT
    assert reply.response_metadata["finish_reason"] == "length"


def test_logprobs_reach_langchain(url):
    reply = chat_model(url, max_tokens=6).invoke(QUESTION, logprobs=True, top_logprobs=2)
    entries = reply.response_metadata["logprobs"]["content"]
    assert len(entries) == 6 and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
    streamed = [e for chunk in chat_model(url, max_tokens=6).stream(QUESTION, logprobs=True)
                for e in (chunk.response_metadata.get("logprobs") or {}).get("content") or []]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in entries]


def test_reasoning_reaches_langchain_as_think_tags():
    """ChatOpenAI drops reasoning_content; asking for think_tags puts the reasoning in content."""
    with scripted_server(settings=ServerSettings(model_name="m", max_new_tokens=4)) as srv:
        llm = ChatOpenAI(base_url=srv.url + "/v1", api_key="none", model="m", max_retries=0,
                         extra_body={"reasoning_format": "think_tags"})
        assert llm.invoke("hello owl").content == "<think>hmm0 hmm1 </think>owl.0 owl.1 "
