"""Grammars for structured output and DeepSeek tool calls, as xgrammar structural tags.

Marker tokens are matched by id (`TokenFormat`), so a call must use the real marker token, never
its text spelled out in ordinary tokens. JSON follows the schema (strictly: no properties beyond
those it names), on one line, so a small model cannot pad it with whitespace forever. A reasoning model
may think first: `reasoning="optional"` allows a leading <think>...</think> block, `"open"` means
the prompt already opened it (the answer starts inside it); the constrained part follows.
"""

from __future__ import annotations

import xgrammar
from xgrammar.structural_tag import (AnyTextFormat, ConstStringFormat, GrammarFormat, OptionalFormat, OrFormat,
                                     RegexFormat, SequenceFormat, StarFormat, StructuralTag, TagFormat, TokenFormat)

from ktransformers.util.constrained import GrammarError, library_reason

REASONING_MODES = (None, "optional", "open")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def json_value(schema: dict | None) -> GrammarFormat:
    """A JSON value valid against `schema` (None: any JSON object), on one line with json.dumps'
    separators: what DeepSeek's templates show the model, and no token spent on layout."""
    try:
        grammar = xgrammar.Grammar.from_json_schema(schema if schema is not None else {"type": "object"},
                                                    any_whitespace=False, strict_mode=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(library_reason(exc)) from None
    return GrammarFormat(grammar=str(grammar), syntax="ebnf")


def _with_reasoning(body, reasoning: str | None) -> StructuralTag:
    if reasoning not in REASONING_MODES:
        raise ValueError(f"reasoning={reasoning!r}: must be one of {REASONING_MODES}")
    if reasoning is None:
        return StructuralTag(format=body)
    gap = RegexFormat(pattern=r"[ \t\r\n]{0,3}")
    if reasoning == "open":
        thought = TagFormat(begin="", content=AnyTextFormat(), end="</think>")
    else:
        thought = OptionalFormat(content=TagFormat(begin="<think>", content=AnyTextFormat(), end="</think>"))
    return StructuralTag(format=SequenceFormat(elements=[thought, gap, body]))


def json_grammar(schema: dict | None = None, reasoning: str | None = None) -> StructuralTag:
    """The answer is one JSON value valid against `schema` (None: any JSON object)."""
    return _with_reasoning(json_value(schema), reasoning)


def _one_call(fmt, tools: list[dict]):
    """`<call_begin>` one of the functions with JSON arguments `<call_end>`, in the model's shape."""
    choices = []
    for tool in tools:
        function = tool["function"]
        arguments = json_value(function.get("parameters") or NO_ARGUMENTS)
        if fmt.typed:   # V3 / R1: function<sep>NAME\n```json\nARGS\n```
            parts = [ConstStringFormat(value="function"), TokenFormat(token=fmt.ids["sep"]),
                     ConstStringFormat(value=f"{function['name']}\n```json\n"), arguments,
                     ConstStringFormat(value="\n```")]
        else:           # V3.1: NAME<sep>ARGS
            parts = [ConstStringFormat(value=function["name"]), TokenFormat(token=fmt.ids["sep"]), arguments]
        choices.append(SequenceFormat(elements=parts))
    content = choices[0] if len(choices) == 1 else OrFormat(elements=choices)
    return TagFormat(begin=TokenFormat(token=fmt.ids["call_begin"]), content=content,
                     end=TokenFormat(token=fmt.ids["call_end"]))


def _calls(fmt, tools: list[dict], parallel: bool):
    call = _one_call(fmt, tools)
    if not parallel:
        return call
    more = StarFormat(content=SequenceFormat(elements=[OptionalFormat(content=ConstStringFormat(value="\n")), call]))
    return SequenceFormat(elements=[call, more])


def tool_calls_grammar(fmt, tools: list[dict], reasoning: str | None = None, parallel: bool = True,
                       json_schema: dict | None = None, json_answer: bool = False) -> StructuralTag:
    """Calls of `tools` between the calls-begin and calls-end tokens (tool_choice "required", or a named
    function when `tools` holds just it); with `json_answer`, a JSON answer instead is allowed too."""
    calls = SequenceFormat(elements=[TokenFormat(token=fmt.ids["calls_begin"]), _calls(fmt, tools, parallel),
                                     TokenFormat(token=fmt.ids["calls_end"])])
    body = OrFormat(elements=[calls, json_value(json_schema)]) if json_answer else calls
    return _with_reasoning(body, reasoning)


def calls_after_begin_grammar(fmt, tools: list[dict], parallel: bool = True) -> StructuralTag:
    """What must follow once the model emitted the calls-begin token on its own (tool_choice "auto")."""
    return StructuralTag(format=SequenceFormat(elements=[_calls(fmt, tools, parallel),
                                                         TokenFormat(token=fmt.ids["calls_end"])]))
