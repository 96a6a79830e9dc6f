"""Tool calling and structured output on the demo model, through the real `openai`, `ollama` and
LangChain clients.

The demo model only knows arithmetic, so it never calls a tool of its own accord ("auto" gets
text); forcing a call (tool_choice "required" or a named function) must still give a call whose
arguments are valid against the function's schema. Oracles: the `jsonschema` validator, the SDKs'
own reassembly of streamed tool calls, and the chat template's rendering of the history.
"""

import json
import time

import jsonschema
import ollama
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from ktransformers.demo import demo_paths
from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import chat_openai_process
from ktransformers.server.wsgi import BackgroundServer

ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 9999}},
       "required": ["a", "b"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two whole numbers", "parameters": ADD}},
         {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]
SCHEMAS = {"add": ADD, "get_weather": WEATHER}
QUESTION = [{"role": "user", "content": "What is 4821 plus 367?"}]


class Recorded:
    """The real generate_fn; keeps each request (with the prompt ids its prepare() made)."""

    def __init__(self, generate_fn):
        self.generate_fn, self.requests = generate_fn, []
        self.prepare = generate_fn.prepare

    def __call__(self, request):
        self.requests.append(request)
        return self.generate_fn(request)


@pytest.fixture(scope="module")
def served():
    model_dir, gguf = demo_paths()
    loaded = load_model(gguf, model_dir)
    backend = Recorded(model_generate_fn(loaded, cache_tokens=0))
    engine = Engine(backend, queue_size=2)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="demo", max_new_tokens=300,
                                                            max_context=loaded.model.max_context))) as url:
        yield url, backend, loaded.tokenizer
    engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_named_function_is_called_with_valid_arguments(client):
    reply = client.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "add"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"].startswith("\n4821+367")   # it thought first
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "add"
    check_call("add", call.function.arguments)


def test_required_call_streams_as_deltas_the_sdk_reassembles(client):
    kwargs = dict(model="demo", messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  temperature=0)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls = {}   # reassembled as the OpenAI docs show: by index, arguments appended
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id and delta.type == "function" and delta.function.name   # the first delta names it
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(calls) == 1
    check_call(calls[0]["name"], calls[0]["arguments"])
    with client.chat.completions.stream(**kwargs) as stream:   # the SDK's own accumulator agrees
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls   # greedy: the same call again (with a new id)
    assert call.function.name == calls[0]["name"] and call.function.arguments == calls[0]["arguments"]


def test_auto_on_the_demo_model_answers_in_text(client):
    reply = client.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, temperature=0)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content.strip() == "4821 + 367 = 5188"


def test_tool_results_reach_the_prompt(served, client):
    """A call in the history and its result are rendered by the model's template, in its tokens."""
    url, backend, tokenizer = served
    args = json.dumps({"a": 4821, "b": 367})
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "add", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "5188"}]
    reply = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0, max_tokens=20)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = tokenizer.decode(backend.requests[-1].prompt_ids)
    assert ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n" + args +
            "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>") in prompt
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>5188<｜tool▁output▁end｜><｜tool▁outputs▁end｜>" in prompt
    assert "### add" in prompt and "### get_weather" in prompt   # the tools, described in the system prompt


class Sum(BaseModel):
    operation: str = Field(pattern="^(plus|minus|times)$")
    result: int = Field(ge=0, le=99999)


def test_json_schema_answers_validate(client):
    reply = client.chat.completions.parse(model="demo", messages=QUESTION, response_format=Sum, temperature=0)
    assert isinstance(reply.choices[0].message.parsed, Sum)   # the SDK parsed and validated it
    schema = Sum.model_json_schema()
    for stream in (False, True):
        kwargs = dict(model="demo", messages=QUESTION, temperature=0, response_format={
            "type": "json_schema", "json_schema": {"name": "sum", "schema": schema}})
        if stream:
            chunks = client.chat.completions.create(stream=True, **kwargs)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_ollama_client_tools_and_format(served):
    url, backend, _ = served
    client = ollama.Client(host=url, timeout=60)

    def add(a: int, b: int) -> int:
        """Add two whole numbers.

        Args:
            a: the first number
            b: the second number
        """
        return a + b

    reply = client.chat(model="demo", messages=QUESTION, tools=[add], options={"temperature": 0})
    assert reply.message.tool_calls is None and reply.message.content.strip() == "4821 + 367 = 5188"
    assert [t["function"]["name"] for t in backend.requests[-1].output_rules.tools] == ["add"]
    history = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "add", "arguments": {"a": 4821, "b": 367}}}]},
        {"role": "tool", "content": "5188", "tool_name": "add"}]
    assert client.chat(model="demo", messages=history, tools=[add], options={"temperature": 0, "num_predict": 8}).done
    parts = list(client.chat(model="demo", messages=QUESTION, format=Sum.model_json_schema(), stream=True,
                             options={"temperature": 0}))
    jsonschema.validate(json.loads("".join(p.message.content for p in parts)), Sum.model_json_schema())
    assert parts[-1].done_reason == "stop"


def test_langchain_bind_tools(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=served[0] + "/v1", api_key="none", model="demo", temperature=0,
                                      max_retries=0, timeout=60)
    bound = llm.bind_tools(TOOLS, tool_choice="add")
    message = bound.invoke("What is 4821 plus 367?")
    [call] = message.tool_calls
    assert call["name"] == "add" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], ADD)
    chunks = list(bound.stream("What is 4821 plus 367?"))   # streamed chunks add up to the same call
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("add", call["args"])]


def error_of(url: str, path: str, body: dict) -> tuple[int, dict]:
    response = requests.post(url + path, json=body, timeout=30)
    return response.status_code, response.json()


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "matrix"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {"type": "null"}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_openai_refusals_name_the_field(served, body, param):
    started = time.monotonic()
    status, answer = error_of(served[0], "/v1/chat/completions", {"model": "demo", "messages": QUESTION, **body})
    assert status == 400 and answer["error"]["param"] == param, answer
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("body, message", [
    ({"format": "yaml"}, "format"),
    ({"format": {"type": "string", "pattern": "(?=x)"}}, "format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
])
def test_ollama_refusals_name_the_field(served, body, message):
    status, answer = error_of(served[0], "/api/chat", {"model": "demo", "messages": QUESTION, **body})
    assert status == 400 and answer["error"].startswith(message), answer


def test_chat_openai_demo_serves_tools():
    """The command users run: Ollama's /api/show lists the "tools" capability, and a forced call works."""
    with chat_openai_process("--demo", "--max_new_tokens", "200") as (port, _):
        url = f"http://127.0.0.1:{port}"
        assert "tools" in ollama.Client(host=url, timeout=30).show("demo").capabilities
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, temperature=0,
                                               tool_choice={"type": "function", "function": {"name": "add"}})
        check_call("add", reply.choices[0].message.tool_calls[0].function.arguments)
