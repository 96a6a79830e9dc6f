"""A small but real byte-level BPE tokenizer with DeepSeek-R1's special tokens, trained deterministically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .chat_template import CHAT_TEMPLATE
from .tiny_corpus import CORPUS

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# Like DeepSeek-V3, bos/eos/pad take ids 0, 1, 2 and the chat markers come after the learned vocabulary.
CHAT_SPECIALS = [
    "<｜User｜>", "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
# In R1 these two are added tokens but not "special": decoding with skip_special_tokens keeps them.
THINK_TOKENS = ["<think>", "</think>"]
TRAINED_VOCAB_SIZE = 800
# DeepSeek-V3's pre-tokenizer (GGUF tokenizer.ggml.pre "deepseek-v3"): numbers in groups of up to
# three digits, runs of CJK, then words / punctuation / whitespace; byte-level mapping comes after.
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass
class TinyTokenizer:
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    def tokens_by_id(self) -> list[str]:
        by_id = {index: token for token, index in self.tokenizer.get_vocab(with_added_tokens=True).items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise RuntimeError("tiny tokenizer ids are not contiguous")
        return [by_id[index] for index in range(len(by_id))]

    def merges(self) -> list[str]:
        """BPE merges as GGUF stores them: 'left right'."""
        merges = json.loads(self.tokenizer.to_str())["model"]["merges"]
        return [" ".join(pair) if isinstance(pair, list) else pair for pair in merges]

    def special_tokens(self) -> set[str]:
        return {BOS, EOS, PAD, *CHAT_SPECIALS}

    def save(self, out_dir: Path, model_max_length: int) -> None:
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "legacy": True,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def build_tiny_tokenizer() -> TinyTokenizer:
    """Train the BPE on the embedded corpus (deterministic: same corpus, same merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in DEEPSEEK_V3_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_SPECIALS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINK_TOKENS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return TinyTokenizer(tokenizer)
