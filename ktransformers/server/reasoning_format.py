"""How reasoning reaches the client: its own field (DeepSeek API style) or inline <think> tags."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningFormatter:
    """Turn each TokenEvent's (reasoning, content) into what the client is sent.

    deepseek:   (reasoning, content) unchanged; the route puts reasoning in its own field.
    think_tags: reasoning folded into content between <think> and </think>.
    """

    def __init__(self, mode: str):
        if mode not in ("deepseek", "think_tags"):
            raise ValueError(f"reasoning format must be 'deepseek' or 'think_tags', got {mode!r}")
        self.inline = mode == "think_tags"
        self._in_think = False

    def feed(self, reasoning: str, content: str) -> tuple[str, str]:
        if not self.inline:
            return reasoning, content
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
        return "", "".join(parts)

    def finish(self) -> tuple[str, str]:
        """Close a think block the model never closed (stopped by max_tokens)."""
        if self._in_think:
            self._in_think = False
            return "", THINK_CLOSE
        return "", ""
