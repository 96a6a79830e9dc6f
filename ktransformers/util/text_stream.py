"""Incremental detokenizer: token ids in, text deltas out, never splitting a character.

Byte-level BPE spreads one character (CJK, emoji) over several tokens. Each step decodes a
small window (the tokens since the last emitted text, plus the previous piece as context
for decoders that treat the start of a text specially) and emits only the new part; while
that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) nothing is emitted. The
concatenated deltas equal `tokenizer.decode(ids, clean_up_tokenization_spaces=False)`
(over the ids left after `hide_control_tokens` drops the control tokens).
"""

from ktransformers.util.reasoning import THINK_CLOSE, THINK_OPEN

REPLACEMENT_CHAR = "\ufffd"


def control_token_ids(tokenizer) -> set[int]:
    """Ids of the special tokens a reader should not see (<｜Assistant｜>, <｜end▁of▁sentence｜>...).

    <think> and </think> stay even where a tokenizer marks them special: the reasoning split needs them.
    """
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    think_ids = {vocab[tag] for tag in (THINK_OPEN, THINK_CLOSE) if tag in vocab}
    return {i for i, token in added.items() if getattr(token, "special", False)} - think_ids


class IncrementalDetokenizer:
    def __init__(self, tokenizer, hide_control_tokens: bool = False):
        self.tokenizer = tokenizer
        self.hidden_ids = control_token_ids(tokenizer) if hide_control_tokens else set()
        self.ids: list[int] = []
        self._context_start = 0  # first id of the already-emitted piece used as context
        self._emitted_end = 0  # ids before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        if self.hidden_ids:
            ids = [i for i in ids if i not in self.hidden_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """End of stream: return any held-back bytes as the tokenizer would decode them."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._emitted_end == len(self.ids):
            return ""
        context = self._decode(self.ids[self._context_start:self._emitted_end])
        window = self._decode(self.ids[self._context_start:])
        if not final and window.endswith(REPLACEMENT_CHAR):
            return ""
        if not window.startswith(context):
            # A decoder rewrote the context once more text followed it; fall back to a
            # full decode so the output stays exact.
            context = self._decode(self.ids[:self._emitted_end])
            window = self._decode(self.ids)
            self._context_start = 0
        else:
            self._context_start = self._emitted_end
        self._emitted_end = len(self.ids)
        return window[len(context):]
