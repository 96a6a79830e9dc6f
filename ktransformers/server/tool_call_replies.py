"""ToolCallEvents (util/tool_calls.py) as OpenAI and Ollama send tool calls.

OpenAI streams each call as deltas: first `{index, id, type, function: {name, arguments: ""}}`,
then `{index, function: {arguments: fragment}}`; a whole reply lists `tool_calls` with the
arguments as a JSON string. Ollama sends each call once it is complete, arguments as an object.
"""

from __future__ import annotations

import json

from ktransformers.util.tool_calls import ToolCallEvent


def is_tool_call(event) -> bool:
    return isinstance(event, ToolCallEvent)


def openai_delta(event: ToolCallEvent) -> dict | None:
    """The `delta` of a streamed chunk for this event (None when it carries nothing new)."""
    if event.name is not None:
        call = {"index": event.index, "id": event.id, "type": "function",
                "function": {"name": event.name, "arguments": event.arguments}}
    elif event.arguments:
        call = {"index": event.index, "function": {"arguments": event.arguments}}
    else:
        return None
    return {"tool_calls": [call]}


class ToolCalls:
    """The calls of one reply, gathered from its events."""

    def __init__(self):
        self.calls: list[dict] = []   # {"id", "name", "arguments", "complete"} by index

    def __bool__(self) -> bool:
        return bool(self.calls)

    def add(self, event: ToolCallEvent) -> dict | None:
        """Record the event; return its call when this event completes it."""
        if event.name is not None:
            self.calls.append({"id": event.id, "name": event.name, "arguments": "", "complete": False})
        call = self.calls[event.index]
        call["arguments"] += event.arguments
        call["complete"] = event.complete
        return call if event.complete else None

    def openai(self) -> list[dict]:
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.calls]

    def ollama(self) -> list[dict]:
        """The complete calls (a call cut short by the token limit has no whole arguments)."""
        return [ollama_call(c) for c in self.calls if c["complete"]]


def ollama_call(call: dict) -> dict:
    return {"function": {"name": call["name"], "arguments": json.loads(call["arguments"])}}
