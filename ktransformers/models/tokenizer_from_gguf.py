"""A Hugging Face fast tokenizer rebuilt from GGUF metadata alone (tokenizer.ggml.* keys).

llama.cpp stores a byte-level BPE vocabulary as tokens + merges + token types and names the
pre-tokenizer (`tokenizer.ggml.pre`); the splitting regexes of each named pre-tokenizer are a
format fact of that model family, listed in PRE_TOKENIZER_SPLITS.
"""

import logging

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# DeepSeek-V3/R1's tokenizer.json: three isolating regex splits, then byte-level mapping without regex.
PRE_TOKENIZER_SPLITS = {
    "deepseek-v3": [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
}


def _pre_tokenizer(pre: str | None):
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        if pre not in (None, "default", "gpt2"):
            log.warning("GGUF pre-tokenizer %r is not known; using GPT-2 byte-level splitting", pre)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(metadata: dict, source: str) -> PreTrainedTokenizerFast:
    embedded = metadata.get(Keys.Tokenizer.HF_JSON)
    if embedded:  # some files carry the original tokenizer.json verbatim
        return _wrap(Tokenizer.from_str(embedded), metadata)

    kind = metadata.get(Keys.Tokenizer.MODEL)
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') GGUF "
                         "tokenizers can be rebuilt (pass --model_path with the Hugging Face tokenizer instead)")
    tokens = metadata.get(Keys.Tokenizer.LIST)
    merges = metadata.get(Keys.Tokenizer.MERGES)
    if not tokens or merges is None:
        raise ValueError(f"{source}: tokenizer.ggml.tokens / tokenizer.ggml.merges are missing")
    types = metadata.get(Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get(Keys.Tokenizer.PRE))
    tok.decoder = decoders.ByteLevel()
    # control tokens are special; user-defined ones (e.g. <think>) are matched whole but not special
    added = [AddedToken(tokens[i], special=(t == TokenType.CONTROL), normalized=False)
             for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    tok.add_tokens(added)

    bos = metadata.get(Keys.Tokenizer.BOS_ID)
    if metadata.get(Keys.Tokenizer.ADD_BOS, False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, bos)])
    return _wrap(tok, metadata)


def _wrap(tok: Tokenizer, metadata: dict) -> PreTrainedTokenizerFast:
    def token(key):
        i = metadata.get(key)
        return None if i is None else tok.id_to_token(i)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token(Keys.Tokenizer.BOS_ID),
        eos_token=token(Keys.Tokenizer.EOS_ID),
        pad_token=token(Keys.Tokenizer.PAD_ID),
        unk_token=token(Keys.Tokenizer.UNK_ID),
        chat_template=metadata.get(Keys.Tokenizer.CHAT_TEMPLATE),
        clean_up_tokenization_spaces=False,
    )

