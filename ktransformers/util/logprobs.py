"""Log-probabilities of the generated tokens, computed only when a request asks for them.

What is reported is the model's own distribution at each step: log_softmax of the raw logits, before
repetition/presence penalties, temperature and the top-k/top-p/min-p filters (as OpenAI, vLLM's default
and llama.cpp's n_probs report them). So a value does not depend on the sampling settings, and a
teacher-forced forward pass over prompt + answer reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

MAX_TOP_LOGPROBS = 20   # OpenAI's and Ollama's limit


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str        # the token's text; U+FFFD where it holds only part of a character
    bytes: bytes     # its exact UTF-8 bytes: joined over tokens they rebuild characters split between them
    logprob: float
    top: tuple["TokenLogprob", ...] = ()   # the most likely tokens at this step, best first


class TokenBytes:
    """The bytes of a token id. Byte-level BPE pieces (DeepSeek's tokenizer) map back through GPT-2's
    byte alphabet exactly; added tokens (<think>, control tokens) are their text; other tokenizers fall
    back to decoding the id alone."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._known = {i: token.content.encode() for i, token in added.items()}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and "ByteLevel" in repr(backend.decoder)
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else None
        self._vocab_size = len(tokenizer)

    def __call__(self, token_id: int) -> bytes:
        if token_id not in self._known:
            self._known[token_id] = self._lookup(token_id)
        return self._known[token_id]

    def _lookup(self, token_id: int) -> bytes:
        if not 0 <= token_id < self._vocab_size:     # padding rows of the output layer
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_of is not None and piece and all(c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False).encode()


class LogprobReporter:
    """For one request: the chosen token's log-probability and the `top` most likely alternatives."""

    def __init__(self, tokenizer, top: int):
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={top!r} is invalid: must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        self.top = top
        self.token_bytes = TokenBytes(tokenizer)

    def _entry(self, token_id: int, logprob: float, top=()) -> TokenLogprob:
        raw = self.token_bytes(token_id)
        return TokenLogprob(token_id, raw.decode("utf-8", errors="replace"), raw, logprob, top)

    def entry(self, logits: torch.Tensor, token_id: int) -> TokenLogprob:
        """`logits` [vocab]: the raw scores the token was sampled from."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = ()
        if self.top:
            values, ids = torch.topk(logprobs, self.top)
            top = tuple(self._entry(i, v) for i, v in zip(ids.tolist(), values.tolist()))
        return self._entry(token_id, float(logprobs[token_id]), top)
