"""Grammars (Lark text, as llguidance reads it) for structured output and DeepSeek tool calls.

Marker tokens are written by id (`<[642]>`), so a call must use the real marker token, never its
text spelled out in ordinary tokens. JSON follows the schema on one line with json.dumps'
separators (what DeepSeek's templates show the model, and no token spent on layout: a small
model cannot pad it with whitespace forever), and objects take only the properties they list
(`closed_objects`). A reasoning model may think first (`Reasoning`):
an optional <think>...</think> block, or, when the prompt already opened it, the rest of it up
to </think>; the constrained part follows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Reasoning:
    """The model may reason before the constrained answer, between these two tokens."""

    open_id: int          # <think>
    close_id: int         # </think>
    started: bool = False  # the prompt ends inside the block (force_think, or a template that opens it)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def closed_objects(schema):
    """A copy of `schema` whose objects that list `properties` take no others unless they say so
    (what OpenAI's strict mode asks for): a function gets only the arguments it declares."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in _SCHEMAS:
        if key in out:
            out[key] = [closed_objects(s) for s in out[key]] if isinstance(out[key], list) else closed_objects(out[key])
    if "properties" in out and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


def _json_rule(name: str, schema: dict | None) -> str:
    """`name`: a JSON value valid against `schema` (None: any JSON object)."""
    schema = closed_objects(schema if schema is not None else {"type": "object"})
    schema["x-guidance"] = {**COMPACT, **(schema.get("x-guidance") or {})}
    return f"{name}: %json {json.dumps(schema, ensure_ascii=False)}"


def _start(body: str, reasoning: Reasoning | None) -> list[str]:
    """The start rule: `body`, after the reasoning when the model reasons first."""
    if reasoning is None:
        return [f"start: {body}"]
    # THOUGHT is text only, so the block ends at the </think> token; R1 then writes "\n\n"
    thought = f"THOUGHT <[{reasoning.close_id}]> GAP"
    rules = [r"THOUGHT: /(.|\n)*/", r"GAP: /[ \t\r\n]{0,3}/"]
    if reasoning.started:
        return [f"start: {thought} {body}", *rules]
    return [f"start: (<[{reasoning.open_id}]> {thought})? {body}", *rules]


def json_grammar(schema: dict | None = None, reasoning: Reasoning | None = None) -> str:
    """The answer is one JSON value valid against `schema` (None: any JSON object)."""
    return "\n".join([*_start("answer", reasoning), _json_rule("answer", schema)])


def _call_rules(fmt, tools: list[dict]) -> list[str]:
    """`call`: the call-begin marker, one of the functions with its JSON arguments, the call-end marker."""
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
    for i, tool in enumerate(tools):
        function = tool["function"]
        name = json.dumps(function["name"])
        if fmt.typed:   # V3 / R1: function<sep>NAME\n```json\nARGS\n```
            head = f'{fmt.token("call_begin")} "function" {fmt.token("sep")} {name} "\\n```json\\n"'
            tail = f'"\\n```" {fmt.token("call_end")}'
        else:           # V3.1: NAME<sep>ARGS
            head = f'{fmt.token("call_begin")} {name} {fmt.token("sep")}'
            tail = fmt.token("call_end")
        rules += [f"call_{i}: {head} args_{i} {tail}",
                  _json_rule(f"args_{i}", function.get("parameters") or NO_ARGUMENTS)]
    return rules


def _calls(parallel: bool) -> str:
    return 'call ("\\n"? call)*' if parallel else "call"


def tool_calls_grammar(fmt, tools: list[dict], reasoning: Reasoning | None = None, parallel: bool = True,
                       json_schema: dict | None = None, json_answer: bool = False) -> str:
    """Calls of `tools` between the calls-begin and calls-end markers (tool_choice "required", or a
    named function when `tools` holds just it); with `json_answer`, a JSON answer instead is allowed too."""
    calls = f'{fmt.token("calls_begin")} {_calls(parallel)} {fmt.token("calls_end")}'
    rules = [*_start(f"({calls} | answer)" if json_answer else calls, reasoning), *_call_rules(fmt, tools)]
    if json_answer:
        rules.append(_json_rule("answer", json_schema))
    return "\n".join(rules)


def calls_after_begin_grammar(fmt, tools: list[dict], parallel: bool = True) -> str:
    """What must follow once the model emitted the calls-begin marker on its own (tool_choice "auto")."""
    return "\n".join([f'start: {_calls(parallel)} {fmt.token("calls_end")}', *_call_rules(fmt, tools)])
