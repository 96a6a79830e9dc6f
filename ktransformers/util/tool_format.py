"""How a DeepSeek model writes tool calls, learned from its own chat template.

DeepSeek-V3/R1 templates render an assistant's `tool_calls` and `tool` results with marker tokens:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(V3.1 and later: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`), but not the
list of `tools`: the system prompt has to describe them. `ToolCallFormat.from_tokenizer` renders a
probe conversation through the template to find which shape (if any) it writes and whether it
renders `tools` itself; `with_tools` adds our description of the tools when it does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MARKERS = {
    "calls_begin": "<｜tool▁calls▁begin｜>", "calls_end": "<｜tool▁calls▁end｜>",
    "call_begin": "<｜tool▁call▁begin｜>", "call_end": "<｜tool▁call▁end｜>", "sep": "<｜tool▁sep｜>",
    "outputs_begin": "<｜tool▁outputs▁begin｜>", "output_begin": "<｜tool▁output▁begin｜>",
}
_PROBE_NAME, _PROBE_ARGS, _PROBE_RESULT = "probe_function", '{"probe": 1}', "probe result 7310"
_PROBE_DESCRIPTION = "probe description 5521"


def _probe_messages() -> list[dict]:
    return [{"role": "user", "content": "probe question"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_probe", "type": "function",
                 "function": {"name": _PROBE_NAME, "arguments": _PROBE_ARGS}}]},
            {"role": "tool", "tool_call_id": "call_probe", "content": _PROBE_RESULT}]


@dataclass(frozen=True)
class ToolCallFormat:
    ids: dict[str, int]        # marker name (MARKERS) -> its token id
    typed: bool                # V3/R1 "function<sep>NAME\n```json..." (True) or V3.1 "NAME<sep>ARGS"
    renders_tools: bool        # the template describes `tools` itself

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ToolCallFormat | None":
        """The format this tokenizer's chat template writes, or None when it cannot render tool calls."""
        vocab = tokenizer.get_vocab()
        if not getattr(tokenizer, "chat_template", None) or any(m not in vocab for m in MARKERS.values()):
            return None
        try:
            text = tokenizer.apply_chat_template(_probe_messages(), tokenize=False, add_generation_prompt=True)
        except Exception:   # a template that chokes on tool messages cannot serve tools
            return None
        ids = {name: vocab[marker] for name, marker in MARKERS.items()}
        for typed in (True, False):
            fmt = cls(ids, typed, renders_tools=False)
            if fmt.render_call(_PROBE_NAME, _PROBE_ARGS) in text and _PROBE_RESULT in text:
                return cls(ids, typed, renders_tools=_renders_tools(tokenizer))
        return None

    def token(self, name: str) -> str:
        """The marker as a grammar token reference (by id)."""
        return f"<[{self.ids[name]}]>"

    def render_call(self, name: str, arguments: str) -> str:
        """One call as the model writes it (markers as their text)."""
        if self.typed:
            inner = f"function{MARKERS['sep']}{name}\n```json\n{arguments}\n```"
        else:
            inner = f"{name}{MARKERS['sep']}{arguments}"
        return f"{MARKERS['call_begin']}{inner}{MARKERS['call_end']}"

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        return MARKERS["calls_begin"] + "".join(self.render_call(n, a) for n, a in calls) + MARKERS["calls_end"]

    def with_tools(self, messages: list[dict], tools: list[dict], tool_choice) -> list[dict]:
        """`messages` with `tools` described at the end of the last system message (DeepSeek's own
        templates keep only the last one), or in a new first one when there is none."""
        if self.renders_tools:
            return messages
        note = self.tools_prompt(tools, tool_choice)
        last = max((i for i, m in enumerate(messages) if m["role"] == "system"), default=None)
        if last is None:
            return [{"role": "system", "content": note}, *messages]
        merged = {**messages[last], "content": f"{messages[last]['content']}\n\n{note}"}
        return [*messages[:last], merged, *messages[last + 1:]]

    def tools_prompt(self, tools: list[dict], tool_choice) -> str:
        lines = ["## Tools", "", "You can call these functions. Each one is listed with what it does and "
                 "the JSON Schema its arguments must follow.", ""]
        for tool in tools:
            function = tool["function"]
            lines += [f"### {function['name']}"]
            if function.get("description"):
                lines += [function["description"]]
            parameters = function.get("parameters") or {"type": "object", "properties": {}}
            lines += [f"Arguments: {json.dumps(parameters, ensure_ascii=False)}", ""]
        example = self.render_calls([("FUNCTION_NAME", '{"argument": "value"}')])
        lines += ["To call functions, end your answer with the calls, written exactly like this "
                  "(one call block per function call, arguments as JSON):", example, "",
                  "Each result comes back to you in a tool output; then continue the answer."]
        if tool_choice == "required":
            lines.append("Call at least one function now.")
        elif isinstance(tool_choice, dict):
            lines.append(f"Call the function {tool_choice['function']['name']} now.")
        else:
            lines.append("Call a function only when it helps; otherwise answer directly.")
        return "\n".join(lines)


def _renders_tools(tokenizer) -> bool:
    """Whether the template writes the `tools` it is given (then we add no description of our own)."""
    probe = [{"type": "function", "function": {"name": _PROBE_NAME, "description": _PROBE_DESCRIPTION,
                                                "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "probe question"}], tools=probe,
                                             tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return _PROBE_DESCRIPTION in text
