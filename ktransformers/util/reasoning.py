"""Split DeepSeek-R1 output into reasoning (inside <think>...</think>) and content.

R1 either starts its answer with "<think>" or, when the prompt already ends with
"<think>\\n" (force_think, or a template that adds it), starts inside the reasoning.
Tags may arrive split over several tokens, so a possible partial tag is held back.
"""

from ktransformers.util.stop_strings import partial_match_length

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningSplitter:
    def __init__(self, start_in_reasoning: bool = False):
        # "start": may still open with <think>; "reasoning": until </think>; "content": the rest
        self.state = "reasoning" if start_in_reasoning else "start"
        self._held = ""

    def push(self, delta: str) -> tuple[str, str]:
        """Feed raw text; return the (reasoning, content) released by it, tags removed."""
        text = self._held + delta
        self._held = ""
        reasoning = content = ""
        if self.state == "start":
            stripped = text.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.state, text = "reasoning", stripped[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(stripped):  # whitespace or a partial tag so far
                self._held = text
                return "", ""
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = text.find(THINK_CLOSE)
            if end < 0:
                keep = partial_match_length(text, [THINK_CLOSE])
                self._held = text[len(text) - keep:]
                return text[: len(text) - keep], ""
            reasoning, text = text[:end], text[end + len(THINK_CLOSE):]
            self.state = "content"
        return reasoning, content + text

    def flush(self) -> tuple[str, str]:
        """The stream ended: release held text where it belongs."""
        held, self._held = self._held, ""
        return (held, "") if self.state == "reasoning" else ("", held)
