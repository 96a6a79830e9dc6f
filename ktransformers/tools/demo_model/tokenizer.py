"""The demo model's tokenizer: byte-level BPE with DeepSeek-R1's special tokens and chat template.

Unlike DeepSeek-V3's pre-tokenizer (numbers in groups of up to three digits) every digit is a
token of its own, so the model sees numbers digit by digit. The BPE is trained on chats drawn
from the task generator (fixed seed), so the same code gives the same vocabulary.
"""

from __future__ import annotations

import random

from jinja2 import Template
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..chat_template import CHAT_TEMPLATE
from ..tiny_tokenizer import BOS, CHAT_SPECIALS, EOS, PAD, THINK_TOKENS, TinyTokenizer
from .task import make_messages, random_problem, reply

VOCAB_SIZE = 640  # learned vocabulary incl. bos/eos/pad; the chat markers and <think> tags come after
DIGIT_SPLITS = (
    r"\p{N}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
GGUF_PRE = "deepseek-v3-digits"  # not a llama.cpp pre-tokenizer: the GGUF carries tokenizer.json verbatim


_TEMPLATE = Template(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    return _TEMPLATE.render(messages=messages, bos_token=BOS, add_generation_prompt=add_generation_prompt)


def training_corpus(n_chats: int = 3000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n_chats):
        problem = random_problem(rng)
        texts.append(render_chat(make_messages(problem, rng, long_context=bool(i % 2))).replace(BOS, "") + reply(problem))
    return texts


def build_demo_tokenizer() -> TinyTokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in DIGIT_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = training_corpus()
    for special in CHAT_SPECIALS + THINK_TOKENS:  # keep the markers out of the learned merges
        corpus = [text.replace(special, "\n") for text in corpus]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_SPECIALS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINK_TOKENS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return TinyTokenizer(tokenizer)
