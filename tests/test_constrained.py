"""Constrained decoding through prefill_and_generate: whatever the logits say, the answer follows the grammar.

A stand-in model draws random logits (seeded), so each run walks a different path through the
grammar; the independent oracles are `json.loads` and the `jsonschema` package's validator.
"""

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from ktransformers.demo import demo_paths
from ktransformers.util.constrained import (BannedTokens, GrammarConstraint, GrammarError, Grammars,
                                            TriggeredConstraint, allowed_tokens)
from ktransformers.util.events import FinishEvent, TokenEvent
from ktransformers.util.grammar import (Reasoning, calls_after_begin_grammar, closed_objects, json_grammar,
                                        tool_calls_grammar)
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.tool_calls import ToolCallEvent, ToolCallParser
from ktransformers.util.tool_format import ToolCallFormat
from ktransformers.util.utils import prefill_and_generate

VOCAB = 653
ORDER = {"type": "object", "additionalProperties": False, "required": ["item", "count", "size", "tags", "gift"],
         "properties": {"item": {"type": "string", "maxLength": 12}, "count": {"type": "integer", "minimum": 1,
                                                                          "maximum": 999},
                        "size": {"enum": ["S", "M", "L"]}, "gift": {"type": "boolean"},
                        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 6}},
                        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}}}
ADD = {"type": "object", "required": ["a", "b"], "additionalProperties": False,
       "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "number"}}}
TOOLS = [{"type": "function", "function": {"name": "order", "parameters": ORDER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]


class RandomModel:
    """Logits drawn at random; `prefer` adds a bonus to chosen tokens (to make a path likely)."""

    max_context = 4096

    def __init__(self, seed: int, prefer: dict[int, float] | None = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.prefer = prefer or {}

    def __call__(self, input_ids, start_pos):
        logits = torch.randn(1, input_ids.shape[1], VOCAB, generator=self.generator) * 3
        for token, bonus in self.prefer.items():
            logits[0, -1, token] += bonus
        return logits


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_paths()[0])


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, VOCAB, {tokenizer.eos_token_id})


@pytest.fixture(scope="module")
def fmt(tokenizer):
    return ToolCallFormat.from_tokenizer(tokenizer)


def generate(tokenizer, model, constraint, parser=None, max_new_tokens=400):
    prompt = tokenizer.encode("<｜User｜>Order something<｜Assistant｜>", add_special_tokens=False)
    events = list(prefill_and_generate(model, tokenizer, prompt, max_new_tokens, constraint=constraint,
                                       tool_calls=parser, sampling=SamplingParams(temperature=1.0, seed=0)))
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    calls = {}
    for e in events:
        if isinstance(e, ToolCallEvent):
            call = calls.setdefault(e.index, {"name": e.name, "arguments": ""})
            call["arguments"] += e.arguments
    return text, list(calls.values()), events[-1]


def test_bitmask_unpacks_bit_j_of_word_i_as_token_32i_plus_j():
    words = torch.tensor([0b101, -2 ** 31, 0x7FFFFFFF], dtype=torch.int32)
    allowed = allowed_tokens(words, 90)
    expected = [i < 90 and bool((int(words[i // 32]) >> (i % 32)) & 1) for i in range(90)]
    assert allowed.tolist() == expected and allowed[0] and allowed[2] and not allowed[1] and allowed[63]


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_answer_always_validates(tokenizer, grammars, seed):
    constraint = GrammarConstraint(grammars.matcher(json_grammar(ORDER)), VOCAB)
    text, _, finish = generate(tokenizer, RandomModel(seed), constraint)
    assert finish.finish_reason == "stop" and constraint.finished
    jsonschema.validate(json.loads(text), ORDER)


@pytest.mark.parametrize("seed", range(6))
def test_forced_calls_always_parse_and_validate(tokenizer, grammars, fmt, seed):
    matcher = grammars.matcher(tool_calls_grammar(fmt, TOOLS, parallel=True))
    # a mild bonus for the calls-end marker: random logits would otherwise chain calls until max_new_tokens
    model = RandomModel(seed, prefer={fmt.ids["calls_end"]: 4.0})
    text, calls, finish = generate(tokenizer, model, GrammarConstraint(matcher, VOCAB),
                                   ToolCallParser(tokenizer, fmt), max_new_tokens=800)
    assert finish.finish_reason == "tool_calls" and text == "" and calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_a_call_the_model_starts_itself_is_held_to_the_grammar(tokenizer, grammars, fmt):
    """tool_choice auto: free text until the calls-begin token, then only a valid call."""
    begin = fmt.ids["calls_begin"]
    for seed in range(4):
        constraint = TriggeredConstraint(begin, grammars.matcher(calls_after_begin_grammar(fmt, TOOLS[1:])), VOCAB)
        model = RandomModel(seed, prefer={begin: 9.0})   # likely enough to come soon, not forced
        text, calls, finish = generate(tokenizer, model, constraint, ToolCallParser(tokenizer, fmt), 600)
        assert constraint.active is not None and finish.finish_reason == "tool_calls"
        assert [c["name"] for c in calls] == ["add"] * len(calls)
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), ADD)


def test_untriggered_constraint_changes_nothing(tokenizer, grammars, fmt):
    free = generate(tokenizer, RandomModel(3), None, max_new_tokens=40)
    banned = BannedTokens([fmt.ids["calls_begin"]])
    prefer = {fmt.ids["calls_begin"]: -100.0}   # never chosen: the text must match the free run
    triggered = TriggeredConstraint(fmt.ids["calls_begin"], grammars.matcher(calls_after_begin_grammar(fmt, TOOLS)),
                                    VOCAB)
    assert generate(tokenizer, RandomModel(3, prefer), triggered, max_new_tokens=40)[0] == \
        generate(tokenizer, RandomModel(3, prefer), None, max_new_tokens=40)[0]
    assert triggered.active is None and free[2].finish_reason == "length"
    text, calls, _ = generate(tokenizer, RandomModel(3, {fmt.ids["calls_begin"]: 100.0}), banned,
                              ToolCallParser(tokenizer, fmt), max_new_tokens=40)
    assert calls == [] and len(text) > 0


def test_reasoning_comes_first_then_the_answer(tokenizer, grammars):
    """R1 style: an optional <think> block, then the JSON; with the block already open, it must close."""
    think, close = tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>")
    for seed, started in [(1, False), (2, False), (3, True)]:
        grammar = json_grammar(ADD, Reasoning(think, close, started))
        text, _, finish = generate(tokenizer, RandomModel(seed, {think: 30.0, close: 12.0}),
                                   GrammarConstraint(grammars.matcher(grammar), VOCAB))
        assert finish.finish_reason == "stop" and "</think>" in text and text.startswith("" if started else "<think>")
        jsonschema.validate(json.loads(text.split("</think>", 1)[1]), ADD)


def test_grammar_errors_are_named(grammars, tokenizer):
    with pytest.raises(GrammarError, match="matrix"):
        grammars.matcher(json_grammar({"type": "matrix"}))
    with pytest.raises(GrammarError, match="(?i)regex|parse|unclosed"):
        grammars.matcher(json_grammar({"type": "string", "pattern": "(unclosed"}))
    constraint = GrammarConstraint(grammars.matcher(json_grammar(ADD)), VOCAB)
    with pytest.raises(RuntimeError, match="breaks the grammar"):
        constraint.accept(tokenizer.convert_tokens_to_ids("a"))   # a JSON answer cannot start with "a"


def test_objects_take_only_the_properties_they_list():
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},     # a property named so
        "open": {"type": "object", "properties": {}, "additionalProperties": True},
        "items": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]}}},
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]["properties"]   # the map is not a schema
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["point"]["additionalProperties"] is False
    assert "additionalProperties" not in schema   # the caller's schema is left alone
    jsonschema.Draft202012Validator.check_schema(closed)
    jsonschema.validate({"properties": {"x": 1}, "items": [{"x": 2.5}, None]}, closed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"extra": 1}, closed)
