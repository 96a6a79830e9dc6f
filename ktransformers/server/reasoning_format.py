"""How reasoning reaches the client: its own field, inline <think> tags, or both.

The values are ours (`think_tags`) and llama.cpp's `reasoning_format` (Dify's OpenAI-compatible
plugin sends those), with llama.cpp's meanings:

    deepseek, auto    reasoning in its own field (reasoning_content, Ollama's thinking); content is the answer
    think_tags, none  reasoning inline in content between <think> and </think>; no reasoning field
                      (llama.cpp's none leaves the raw text; ours restores the opening tag when the
                      prompt opened the think block, so content is always well formed)
    deepseek-legacy   both: <think>...</think> kept in content and the reasoning field filled
"""

from __future__ import annotations

from typing import Literal, get_args

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

ReasoningFormat = Literal["deepseek", "think_tags", "auto", "none", "deepseek-legacy"]
REASONING_FORMATS: tuple[str, ...] = get_args(ReasoningFormat)
_SEPARATE = {"deepseek", "auto", "deepseek-legacy"}   # reasoning sent in its own field
_INLINE = {"think_tags", "none", "deepseek-legacy"}   # reasoning folded into content between tags


class ReasoningFormatter:
    """Turn each TokenEvent's (reasoning, content) into what the client is sent.

    `separate`: the route sends the reasoning in its own field; `inline`: content carries it between tags.
    """

    def __init__(self, mode: str):
        if mode not in REASONING_FORMATS:
            raise ValueError(f"reasoning format must be one of {REASONING_FORMATS}, got {mode!r}")
        self.separate = mode in _SEPARATE
        self.inline = mode in _INLINE
        self._in_think = False

    def feed(self, reasoning: str, content: str) -> tuple[str, str]:
        shown = self._fold(reasoning, content) if self.inline else content
        return (reasoning if self.separate else ""), shown

    def _fold(self, reasoning: str, content: str) -> str:
        parts = []
        if reasoning:
            if not self._in_think:
                parts.append(THINK_OPEN)
                self._in_think = True
            parts.append(reasoning)
        if content:
            if self._in_think:
                parts.append(THINK_CLOSE)
                self._in_think = False
            parts.append(content)
        return "".join(parts)

    def finish(self) -> tuple[str, str]:
        """Close a think block the model never closed (stopped by max_tokens)."""
        if self._in_think:
            self._in_think = False
            return "", THINK_CLOSE
        return "", ""
