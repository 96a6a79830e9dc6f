"""Parse DeepSeek tool calls from the generated token ids, as they stream.

The parser reads token ids, not detokenized text: the marker tokens are control tokens the
detokenizer hides. Between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>` every token is
the parser's (never content, never matched against stop strings); each call becomes a first
`ToolCallEvent` carrying its id and name, then fragments of its JSON arguments, then one with
`complete=True` at `<｜tool▁call▁end｜>`. Both shapes are read whatever the template says:
V3/R1 `function<sep>NAME\\n```json\\nARGS\\n```` and V3.1 `NAME<sep>ARGS` (fence optional).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ktransformers.util.stop_strings import partial_match_length
from ktransformers.util.text_stream import IncrementalDetokenizer

OPEN_FENCES = ("```json\n", "```\n")
CLOSE_FENCE = "\n```"


@dataclass(frozen=True)
class ToolCallEvent:
    """A piece of the `index`-th tool call of the answer."""

    token_id: int | None
    index: int
    id: str | None = None       # the first event of a call: its id (call_...) and function name
    name: str | None = None
    arguments: str = ""         # the next fragment of the JSON arguments
    complete: bool = False      # the call's end marker arrived: its arguments are whole


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    def __init__(self, tokenizer, fmt):
        self._tokenizer = tokenizer
        self._ids = fmt.ids
        self._state = "text"   # text | calls | head | name | arguments
        self.calls = 0         # calls opened so far
        self.completed = 0     # calls whose end marker arrived
        self._pending = ""     # undecided text of the current piece (name, fence)

    def push(self, token: int) -> list[ToolCallEvent] | None:
        """The events `token` completes, or None when it is ordinary text (not inside a calls section)."""
        ids, state = self._ids, self._state
        if state == "text":
            if token != ids["calls_begin"]:
                return None
            self._state = "calls"
            return []
        if token == ids["calls_end"]:
            events = self._close(token) if state == "arguments" else []
            self._state = "text"
            return events
        if token == ids["call_begin"]:
            events = self._close(token) if state == "arguments" else []
            self._state, self._pending = "head", ""
            self._detok = IncrementalDetokenizer(self._tokenizer)
            return events
        if state == "calls":    # whitespace between calls
            return []
        if token == ids["call_end"]:   # a call cut short before its arguments is dropped
            if state == "arguments":
                return self._close(token)
            self._state = "calls"
            return []
        if token == ids["sep"] and state == "head":
            head, self._pending = self._pending.strip(), ""
            if head == "function":   # V3/R1: the type, the name follows on its own line
                self._state = "name"
                return []
            return self._start(token, head)
        text = self._detok.push(token)
        if state in ("head", "name"):
            self._pending += text
            if state == "name" and "\n" in self._pending:
                name, rest = self._pending.split("\n", 1)
                self._pending = ""
                return self._start(token, name.strip(), rest)
            return []
        return self._arguments(token, text)

    def _start(self, token: int, name: str, rest: str = "") -> list[ToolCallEvent]:
        self._state, self._fence_open, self._index = "arguments", None, self.calls
        self.calls += 1
        return [ToolCallEvent(token, self._index, id=new_call_id(), name=name), *self._arguments(token, rest)]

    def _arguments(self, token: int, text: str) -> list[ToolCallEvent]:
        """Pass argument text on, less an opening fence and anything that may begin the closing one."""
        self._pending += text
        if self._fence_open is None:
            if any(f.startswith(self._pending) and f != self._pending for f in OPEN_FENCES):
                return []   # nothing yet, or what may still become a fence
            fence = next((f for f in OPEN_FENCES if self._pending.startswith(f)), "")
            self._fence_open, self._pending = bool(fence), self._pending[len(fence):]
        # hold back whatever may be the start of the closing fence, or all of it ("x": any longer text)
        keep = partial_match_length(self._pending, [CLOSE_FENCE + "x"]) if self._fence_open else 0
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return [ToolCallEvent(token, self._index, arguments=out)] if out else []

    def _close(self, token: int) -> list[ToolCallEvent]:
        tail = self._detok.flush()
        self._pending += tail
        if self._fence_open is None:   # only a prefix of a fence arrived: it was text after all
            self._fence_open = False
        rest = self._pending
        if self._fence_open and rest.endswith(CLOSE_FENCE):
            rest = rest[:-len(CLOSE_FENCE)]
        self._pending, self._state = "", "calls"
        self.completed += 1
        return [ToolCallEvent(token, self._index, arguments=rest, complete=True)]
