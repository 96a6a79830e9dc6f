"""Stop strings over a stream of text deltas.

Text is released as soon as it cannot be the start of a stop string; only the longest
suffix that could still grow into one is held back. Once a stop string appears, it and
everything after it are dropped.
"""

from typing import Iterable


def partial_match_length(text: str, patterns: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `patterns`."""
    longest = 0
    for pattern in patterns:
        for size in range(min(len(text), len(pattern) - 1), longest, -1):
            if pattern.startswith(text[-size:]):
                longest = size
                break
    return longest


def normalize_stop(stop) -> list[str]:
    """None, one string or a list of strings -> a list of non-empty strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for i, item in enumerate(stops):
        if not isinstance(item, str) or not item:
            raise ValueError(f"stop[{i}]={item!r} is invalid: stop strings must be non-empty strings")
    return stops


class StopStringMatcher:
    def __init__(self, stop=None):
        self.stops = normalize_stop(stop)
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Feed new text; return what is safe to show. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = partial_match_length(text, self.stops)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The stream ended without a match: release what was held back."""
        held, self._held = self._held, ""
        return held
