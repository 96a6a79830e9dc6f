"""Log-probabilities on the wire (the values come from util/logprobs.py: the model's own log-softmax).

OpenAI chat and Ollama send one entry per token, {token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}; legacy completions send parallel lists. Each entry covers every generated token,
reasoning included; a chunk carries the entries of the tokens whose text it is the first to send
(a token whose bytes end inside a character waits for the chunk that completes it).
"""

from __future__ import annotations

import codecs

from ktransformers.util.logprobs import TokenLogprob


def _alternative(lp: TokenLogprob) -> dict:
    return {"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.bytes)}


def token_entry(lp: TokenLogprob) -> dict:
    """OpenAI chat's ChatCompletionTokenLogprob, which is also Ollama's logprobs entry."""
    return {**_alternative(lp), "top_logprobs": [_alternative(t) for t in lp.top]}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [token_entry(lp) for lp in entries]}


def completion_logprobs(entries: list[TokenLogprob], start: int = 0) -> dict:
    """Legacy completions' shape; text_offset counts characters from the completion's start (`start`:
    characters sent before these tokens) to where each token's text begins."""
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")   # as the text was decoded: lossy, in order
    offsets = []
    for lp in entries:
        offsets.append(start)
        start += len(text.decode(lp.bytes))
    return {"tokens": [lp.text for lp in entries], "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{t.text: t.logprob for t in lp.top} for lp in entries], "text_offset": offsets}


class PendingLogprobs:
    """Entries of tokens not reported yet; `take` hands them to the next chunk that goes out."""

    def __init__(self, wanted: bool):
        self.wanted = wanted
        self._entries: list[TokenLogprob] = []

    def add(self, event) -> None:
        if self.wanted and getattr(event, "logprob", None) is not None:
            self._entries.append(event.logprob)

    def take(self) -> list[TokenLogprob]:
        entries, self._entries = self._entries, []
        return entries
