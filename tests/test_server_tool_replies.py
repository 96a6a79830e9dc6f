"""A model that calls a tool on its own (tool_choice auto), as the real `openai` and `ollama` clients see it.

The stand-in model "says" a scripted answer with the demo model's tokenizer: reasoning, a
sentence, then a DeepSeek tool call. The server must send the sentence as content and the call
as tool_calls; a call whose scripted arguments break the schema is held to it by the grammar.
"""

import json

import jsonschema
import ollama
import openai
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from ktransformers.demo import demo_paths
from ktransformers.models.loader import LoadedModel
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer
from ktransformers.util.tool_format import ToolCallFormat

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": ADD}}]
USER = [{"role": "user", "content": "Add 2 and 3 with the tool."}]
GREEDY = {"temperature": 0}   # where the grammar masks the scripted token, the first allowed one is taken


class SaysScript:
    """A model whose logits make any sampler pick script[i] as the i-th answer token; where a grammar
    forbids it, ending (`enders`) comes next, as a model would rather stop than ramble."""

    def __init__(self, script: list[int], vocab_size: int, enders: list[int]):
        self.script, self.vocab_size, self.max_context, self.prompt_len = script, vocab_size, 512, 0
        self.enders = enders

    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        if start_pos == 0:
            self.prompt_len = input_ids.shape[1]
        answered = start_pos + input_ids.shape[1] - self.prompt_len
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.enders] = 50.0
        logits[0, -1, self.script[min(answered, len(self.script) - 1)]] = 100.0
        return logits


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_paths()[0])


def serve(tokenizer, said: str):
    script = tokenizer.encode(said + tokenizer.eos_token, add_special_tokens=False)
    enders = tokenizer.convert_tokens_to_ids(["<｜tool▁calls▁end｜>", tokenizer.eos_token])
    loaded = LoadedModel(SaysScript(script, len(tokenizer), enders), tokenizer, None,
                         GenerationConfig.from_pretrained(demo_paths()[0]))
    engine = Engine(model_generate_fn(loaded, cache_tokens=0), queue_size=2)
    return engine, BackgroundServer(create_app(engine, ServerSettings(model_name="says", max_new_tokens=120)))


@pytest.fixture(scope="module", params=[True, False], ids=["valid-arguments", "arguments-breaking-the-schema"])
def served(request, tokenizer):
    fmt = ToolCallFormat.from_tokenizer(tokenizer)
    args = '{"a": 2, "b": 3}' if request.param else '{"a": "two", "b": 3.5, "c": 1}'
    said = "<think>Use the tool.</think>I will add them." + fmt.render_calls([("add", args)])
    engine, server = serve(tokenizer, said)
    with server as url:
        yield url, request.param
    engine.stop()


def test_openai_gets_text_then_the_call(served):
    url, valid = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="says", messages=USER, tools=TOOLS, **GREEDY)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content == "I will add them." and message.model_extra["reasoning_content"] == "Use the tool."
    [call] = message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, {**ADD, "additionalProperties": False})
    assert (args == {"a": 2, "b": 3}) == valid
    chunks = list(client.chat.completions.create(model="says", messages=USER, tools=TOOLS, stream=True, **GREEDY))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    first_call = next(i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls)
    assert content == "I will add them." and not any(c.choices[0].delta.content for c in chunks[first_call:])
    with client.chat.completions.stream(model="says", messages=USER, tools=TOOLS, **GREEDY) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == args


def test_ollama_gets_the_call_with_object_arguments(served):
    url, valid = served
    client = ollama.Client(host=url, timeout=30)
    reply = client.chat(model="says", messages=USER, tools=TOOLS, options=GREEDY)
    assert reply.message.content == "I will add them." and reply.message.thinking == "Use the tool."
    [call] = reply.message.tool_calls
    assert call.function.name == "add" and reply.done_reason == "stop"
    jsonschema.validate(dict(call.function.arguments), {**ADD, "additionalProperties": False})
    assert (dict(call.function.arguments) == {"a": 2, "b": 3}) == valid
    parts = list(client.chat(model="says", messages=USER, tools=TOOLS, stream=True, options=GREEDY))
    [with_call] = [p for p in parts if p.message.tool_calls]
    assert not with_call.done and with_call.message.tool_calls == reply.message.tool_calls
    assert "".join(p.message.content or "" for p in parts) == "I will add them." and parts[-1].done


def test_tool_choice_none_bans_the_call(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="says", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=30)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
    assert reply.choices[0].message.content.startswith("I will add them.")


def test_json_object_is_held_to_json(tokenizer):
    engine, server = serve(tokenizer, '{"x": [1, "y"], "z": {}}')
    with server as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        text = client.chat.completions.create(model="says", messages=USER,
                                              response_format={"type": "json_object"}).choices[0].message.content
        assert json.loads(text) == {"x": [1, "y"], "z": {}}
        answer = ollama.Client(host=url, timeout=30).chat(model="says", messages=USER, format="json").message.content
        assert json.loads(answer) == {"x": [1, "y"], "z": {}}
    engine.stop()
