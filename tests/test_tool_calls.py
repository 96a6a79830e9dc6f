"""The tool-call format read from chat templates, the tools prompt, and the token-id parser.

Oracles: the demo model's own chat template (DeepSeek-V3's shape) renders the calls the parser
must read back; `json.loads` checks the reassembled arguments.
"""

import copy
import json

import pytest
from transformers import AutoTokenizer

from ktransformers.demo import demo_paths
from ktransformers.util.chat import build_prompt_text
from ktransformers.util.tool_calls import ToolCallParser
from ktransformers.util.tool_format import MARKERS, ToolCallFormat

# A V3.1-style template (NAME<sep>ARGS, no fence) and one that knows nothing of tools, written for these tests.
V31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] or '' }}{% if m.get('tool_calls') %}"
    "<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>{{ c['function']['name'] }}"
    "<｜tool▁sep｜>{{ c['function']['arguments'] }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}"
    "<｜end▁of▁sentence｜>{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}"
    "<｜tool▁output▁end｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                  "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] or '' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
TOOLS_TEMPLATE = "{% for t in tools or [] %}[{{ t['function']['description'] }}]{% endfor %}" + V31_TEMPLATE
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(demo_paths()[0])


def with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_format_read_from_templates(demo_tokenizer):
    fmt = ToolCallFormat.from_tokenizer(demo_tokenizer)
    assert fmt is not None and fmt.typed and not fmt.renders_tools
    assert fmt.ids == {name: demo_tokenizer.convert_tokens_to_ids(marker) for name, marker in MARKERS.items()}
    v31 = ToolCallFormat.from_tokenizer(with_template(demo_tokenizer, V31_TEMPLATE))
    assert v31 is not None and not v31.typed and not v31.renders_tools
    assert ToolCallFormat.from_tokenizer(with_template(demo_tokenizer, TOOLS_TEMPLATE)).renders_tools
    assert ToolCallFormat.from_tokenizer(with_template(demo_tokenizer, PLAIN_TEMPLATE)) is None
    assert ToolCallFormat.from_tokenizer(with_template(demo_tokenizer, "{{ raise_exception('no') }}")) is None


def test_render_call_matches_the_template(demo_tokenizer):
    """What we render as the model's call is what its template renders for a call in the history."""
    fmt = ToolCallFormat.from_tokenizer(demo_tokenizer)
    args = '{"city": "Paris"}'
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]}]
    assert fmt.render_calls([("get_weather", args)]) in build_prompt_text(demo_tokenizer, history)


def test_tools_prompt_ends_the_system_prompt(demo_tokenizer):
    fmt = ToolCallFormat.from_tokenizer(demo_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    out = fmt.with_tools(messages, [WEATHER], "auto")
    assert [m["role"] for m in out] == ["system", "user"] and out[1] == messages[1]
    assert out[0]["content"].startswith("Be brief.\n\n## Tools") and messages[0]["content"] == "Be brief."
    assert fmt.with_tools(messages[1:], [WEATHER], "auto")[0] == {"role": "system", "content": out[0]["content"][11:]}
    note = out[0]["content"]
    assert "### get_weather" in note and "Weather of a city" in note
    assert json.dumps(WEATHER["function"]["parameters"]) in note
    assert fmt.render_calls([("FUNCTION_NAME", '{"argument": "value"}')]) in note
    assert "Call the function get_weather now." in fmt.tools_prompt([WEATHER], {"function": {"name": "get_weather"}})
    assert "at least one" in fmt.tools_prompt([WEATHER], "required")
    prompt = build_prompt_text(demo_tokenizer, out)
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools")


def parse(tokenizer, fmt, text):
    """Feed `text`'s tokens one by one: (the ids the parser left as text, calls by index)."""
    parser, plain, calls = ToolCallParser(tokenizer, fmt), [], {}
    for token in tokenizer.encode(text, add_special_tokens=False):
        events = parser.push(token)
        if events is None:
            plain.append(token)
            continue
        for event in events:
            assert event.token_id == token
            call = calls.setdefault(event.index, {"id": None, "name": None, "arguments": "", "complete": False})
            if event.name is not None:
                assert call["name"] is None and event.id.startswith("call_")
                call.update(id=event.id, name=event.name)
            call["arguments"] += event.arguments
            call["complete"] = event.complete
    return tokenizer.decode(plain), list(calls.values()), parser


@pytest.mark.parametrize("typed", [True, False], ids=["v3", "v3.1"])
def test_parser_reads_calls_token_by_token(demo_tokenizer, typed):
    fmt = ToolCallFormat(ToolCallFormat.from_tokenizer(demo_tokenizer).ids, typed, False)
    tricky = json.dumps({"code": "x = 1\n```\ny", "quote": "\"`\\", "unicode": "Grüße 🌦"})
    text = "Let me check." + fmt.render_calls([("get_weather", '{"city": "Paris"}'), ("run", tricky)])
    shown, calls, parser = parse(demo_tokenizer, fmt, text)
    assert shown == "Let me check."
    assert [(c["name"], c["arguments"], c["complete"]) for c in calls] == [
        ("get_weather", '{"city": "Paris"}', True), ("run", tricky, True)]
    assert len({c["id"] for c in calls}) == 2 and parser.completed == 2
    assert parser.push(demo_tokenizer.convert_tokens_to_ids("<｜end▁of▁sentence｜>")) is None   # text again


def test_parser_tolerates_both_shapes_whatever_the_template(demo_tokenizer):
    """V3.1's unfenced NAME<sep>ARGS and a fenced V3.1 call both parse under the V3 format."""
    fmt = ToolCallFormat.from_tokenizer(demo_tokenizer)
    b, e, cb, ce, sep = (MARKERS[k] for k in ("calls_begin", "calls_end", "call_begin", "call_end", "sep"))
    for body in ('add{sep}{{"a": 1}}', 'add{sep}```json\n{{"a": 1}}\n```', 'function{sep}add\n{{"a": 1}}'):
        _, calls, _ = parse(demo_tokenizer, fmt, b + cb + body.format(sep=sep) + ce + "\n" + e)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("add", {"a": 1})]


def test_parser_holds_back_only_what_may_be_the_closing_fence(demo_tokenizer):
    """Arguments stream as they come; a call cut short (max_tokens) is left incomplete."""
    fmt = ToolCallFormat.from_tokenizer(demo_tokenizer)
    cut = fmt.render_calls([("f", '{"a": [1, 2, 3]}')]).split("\n```<")[0]
    _, calls, parser = parse(demo_tokenizer, fmt, cut)
    assert calls[0]["arguments"] == '{"a": [1, 2, 3]}' and not calls[0]["complete"]
    assert parser.completed == 0
    _, calls, _ = parse(demo_tokenizer, fmt, cut + "\n``")
    assert calls[0]["arguments"] == '{"a": [1, 2, 3]}'
