"""Tools, tool_choice, response_format (OpenAI) and tools, format (Ollama) -> OutputRules, and the
history's tool calls and results -> the messages a chat template renders.

Everything that needs more than one field is checked here, before the request queues: a
tool_choice naming a function not in `tools`, parameter and response schemas that are not valid
JSON Schemas (checked with the jsonschema package). Each failure is a 400 naming the field.
"""

from __future__ import annotations

import json

from jsonschema import Draft202012Validator, SchemaError

from ktransformers.server.errors import APIError
from ktransformers.util.structured import OutputRules


def _check_schema(schema: dict, param: str) -> None:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise APIError(400, f"{param}: not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else ""),
                       param=param, code="invalid_schema") from None


def _tools(tools, param: str = "tools") -> list[dict]:
    seen, out = set(), []
    for i, tool in enumerate(tools):
        function = tool.function
        if function.name in seen:
            raise APIError(400, f"{param}[{i}].function.name: {function.name!r} is listed twice",
                           param=f"{param}[{i}].function.name", code="invalid_value")
        seen.add(function.name)
        if function.parameters is not None:
            _check_schema(function.parameters, f"{param}[{i}].function.parameters")
        out.append({"type": "function", "function": function.model_dump(exclude_none=True, include={
            "name", "description", "parameters"})})
    return out


def openai_output_rules(body) -> OutputRules | None:
    """OutputRules of a chat completion request, or None when it asks for nothing special."""
    tools = _tools(body.tools or [])
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not isinstance(choice, str):
        name = choice.function.name
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice: names the function {name!r}, which is not in tools",
                           param="tool_choice", code="invalid_value")
        choice = {"type": "function", "function": {"name": name}}
    elif choice == "required" and not tools:
        raise APIError(400, "tool_choice: 'required' needs tools to call; none were given",
                       param="tool_choice", code="invalid_value")
    schema = _response_schema(body.response_format)
    if not tools and schema is None:
        return None
    return OutputRules(tools=tools, tool_choice=choice, json_schema=schema,
                       parallel_tool_calls=body.parallel_tool_calls is not False)


def _response_schema(response_format) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if spec is None:
        raise APIError(400, "response_format.json_schema: required when type is json_schema",
                       param="response_format.json_schema", code="invalid_value")
    if spec.schema_ is None:
        return {"type": "object"}
    _check_schema(spec.schema_, "response_format.json_schema.schema")
    return spec.schema_


def ollama_output_rules(body) -> OutputRules | None:
    """OutputRules of an Ollama chat/generate request (`tools` on chat only, `format` on both)."""
    tools = _tools(getattr(body, "tools", None) or [])
    fmt = body.format
    if fmt in (None, ""):
        schema = None
    elif fmt == "json":
        schema = {"type": "object"}
    elif isinstance(fmt, dict):
        _check_schema(fmt, "format")
        schema = fmt
    else:
        raise APIError(400, f'format: {fmt!r} is not supported: give "json" or a JSON Schema object',
                       param="format", code="invalid_value")
    if not tools and schema is None:
        return None
    return OutputRules(tools=tools, tool_choice="auto" if tools else "none", json_schema=schema, json_param="format")


def _arguments(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def history_message(message, text: str) -> dict:
    """A validated OpenAI or Ollama message as the chat template takes it (`text`: its content)."""
    out = {"role": "system" if message.role == "developer" else message.role, "content": text}
    if message.tool_calls:
        out["tool_calls"] = [{"id": getattr(call, "id", None) or f"call_{i}", "type": "function",
                              "function": {"name": call.function.name,
                                           "arguments": _arguments(call.function.arguments)}}
                             for i, call in enumerate(message.tool_calls)]
    for key in ("tool_call_id", "tool_name"):
        if getattr(message, key, None):
            out[key] = getattr(message, key)
    return out
