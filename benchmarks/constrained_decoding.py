"""Per-token cost of constrained decoding with xgrammar and llguidance, next to a decode step.

    pip install xgrammar   # the comparison needs it; the server uses llguidance only
    python benchmarks/constrained_decoding.py [--corpus-mb 40] [--repeat 5] [--walks 40]

Two vocabularies: the demo model's (653 tokens) and a DeepSeek-V3-sized one (128,000 byte-level
BPE entries trained here on the Python sources of the installed packages, with DeepSeek's special
tokens added and the logits padded to 129,280 like V3's lm_head; built once, cached under
~/.cache/ktransformers). Two grammars, the same Lark text for both libraries: a JSON schema
(`response_format`) and a forced DeepSeek tool call among 30 tools (what Open-WebUI sends).

For each, the decode walks a valid answer token by token and times what a step adds: computing
the allowed-token bitmask (the library), applying it to the logits (one torch op, shared) and
advancing the matcher by the sampled token (the library). "ready" is the per-request setup:
grammar compilation, matcher construction and the first mask. Then, on the demo vocabulary, each
library samples `--walks` answers from random logits under the JSON schema, and the answers that
`json.loads` or the `jsonschema` validator refuse are counted (they should be none). The last
lines time a demo-model decode step and the sampler on a 129,280-entry row, so the overhead can
be read against them (a DeepSeek-V3 decode step is ~150-600 ms on a workstation: README, Performance).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import jsonschema
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ktransformers.demo import demo_paths
from ktransformers.tools.tiny_tokenizer import BOS, CHAT_SPECIALS, DEEPSEEK_V3_SPLITS, EOS, PAD, THINK_TOKENS
from ktransformers.util.constrained import Grammars, apply_bitmask
from ktransformers.util.grammar import json_grammar, tool_calls_grammar
from ktransformers.util.tool_format import ToolCallFormat

V3_TRAINED, V3_LOGITS = 128_000, 129_280
CACHE = Path.home() / ".cache" / "ktransformers" / "bench-tokenizer-v3-size"

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "include": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                     "required": ["lat", "lon"], "additionalProperties": False},
    },
    "required": ["city", "unit", "days", "include", "location"],
    "additionalProperties": False,
}
ANSWER = {"city": "San Francisco", "unit": "celsius", "days": 7, "include": ["wind", "humidity", "uv index"],
          "location": {"lat": 37.7749, "lon": -122.4194}}
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}" if i else "get_weather",
                                           "description": f"Tool number {i}", "parameters": SCHEMA}}
         for i in range(30)]


def v3_sized_tokenizer(corpus_mb: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with DeepSeek-V3's pre-tokenizer and vocabulary size, trained on local text."""
    path = CACHE / "tokenizer.json"
    if not path.is_file():
        root = Path(torch.__file__).parents[1]  # site-packages: code and docstrings in many styles
        files, budget = [], corpus_mb << 20
        for file in sorted(root.rglob("*.py")):
            files.append(file)
            budget -= file.stat().st_size
            if budget <= 0:
                break
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_V3_SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)]
        trainer = trainers.BpeTrainer(vocab_size=V3_TRAINED, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        started = time.perf_counter()
        tok.train_from_iterator((f.read_text("utf-8", errors="replace") for f in files), trainer)
        # DeepSeek-V3 adds ~800 control tokens after the learned vocabulary (most are placeholders).
        placeholders = [f"<｜place▁holder▁no▁{i}｜>" for i in range(800)]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS + placeholders])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
        CACHE.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
        print(f"trained a {tok.get_vocab_size()}-token BPE on {len(files)} files in "
              f"{time.perf_counter() - started:.0f} s ({path})")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = AutoTokenizer.from_pretrained(demo_paths()[0]).chat_template   # V3's shape
    return tokenizer


class LLGuidance:
    """What the server uses (util/constrained.py)."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        self.grammars = Grammars(tokenizer, vocab, {tokenizer.eos_token_id})

    def matcher(self, lark: str):
        return self.grammars.matcher(lark)

    @staticmethod
    def fill(m, bitmask):
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    @staticmethod
    def accept(m, token) -> bool:
        return m.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.xgr, self.compiler = xgrammar, xgrammar.GrammarCompiler(info, cache_enabled=False)

    def matcher(self, lark: str):
        return self.xgr.GrammarMatcher(self.compiler.compile_lark(lark))

    @staticmethod
    def fill(m, bitmask):
        m.fill_next_token_bitmask(bitmask.view(1, -1))

    @staticmethod
    def accept(m, token) -> bool:
        return m.accept_token(token)


LIBRARIES = (LLGuidance, XGrammar) if importlib.util.find_spec("xgrammar") else (LLGuidance,)


def walk(lib, lark: str, target: list[int], vocab: int) -> dict:
    """Compile, then mask/apply/accept along `target`: medians over the steps, in microseconds."""
    bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    logits = torch.randn(vocab)
    started = time.perf_counter()
    m = lib.matcher(lark)
    lib.fill(m, bitmask)   # llguidance builds lazily: count the first mask as setup
    ready_us = (time.perf_counter() - started) * 1e6
    fill, apply, accept = [], [], []
    for step, token in enumerate(target):
        t0 = time.perf_counter()
        if step:
            lib.fill(m, bitmask)
        t1 = time.perf_counter()
        masked = apply_bitmask(logits, bitmask)
        t2 = time.perf_counter()
        if not (masked[token] > -torch.inf and lib.accept(m, token)):
            raise RuntimeError(f"{lib.name} refused token {token} of a valid answer")
        t3 = time.perf_counter()
        if step:
            fill.append(t1 - t0), apply.append(t2 - t1), accept.append(t3 - t2)
    us = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    library = [a + c for a, c in zip(fill, accept)]
    return {"ready": ready_us, "mask": us(fill), "apply": us(apply), "accept": us(accept), "library": us(library),
            "p90": sorted(library)[int(0.9 * (len(library) - 1))] * 1e6}


def workloads(tokenizer) -> dict[str, tuple[str, list[int]]]:
    fmt = ToolCallFormat.from_tokenizer(tokenizer)
    args = json.dumps(ANSWER)
    calls = fmt.render_calls([("get_weather", args)])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return {"json_schema": (json_grammar(SCHEMA), encode(args)),
            "tool_call(30)": (tool_calls_grammar(fmt, TOOLS), encode(calls))}


def invalid_answers(lib, lark: str, vocab: int, eos: int, decode, walks: int) -> tuple[int, int]:
    """(answers json.loads or jsonschema refuse, walks that did not finish in 400 tokens)."""
    from ktransformers.util.sampling import Sampler, SamplingParams
    bad = unfinished = 0
    for seed in range(walks):
        m, bitmask, ids = lib.matcher(lark), torch.zeros((vocab + 31) // 32, dtype=torch.int32), []
        sampler, generator = Sampler(SamplingParams(temperature=1.0, seed=seed)), torch.Generator().manual_seed(seed)
        for _ in range(400):
            lib.fill(m, bitmask)
            token = sampler.sample(apply_bitmask(torch.randn(vocab, generator=generator) * 3, bitmask))
            if token == eos:
                break
            lib.accept(m, token)
            ids.append(token)
        else:
            unfinished += 1
            continue
        try:
            jsonschema.validate(json.loads(decode(ids)), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            bad += 1
    return bad, unfinished


def demo_decode_ms() -> float:
    from ktransformers.models.loader import load_model
    from ktransformers.util.chat import build_prompt_ids
    from ktransformers.util.utils import prefill_and_generate
    model_dir, gguf = demo_paths()
    loaded = load_model(gguf, model_dir)
    ids = build_prompt_ids(loaded.tokenizer, [{"role": "user", "content": "What is 4821 plus 367?"}])
    finish = list(prefill_and_generate(loaded.model, loaded.tokenizer, ids, 64))[-1]
    return 1e3 / finish.decode_tokens_per_s


def sampler_ms(vocab: int) -> float:
    from ktransformers.util.sampling import Sampler, SamplingParams
    sampler, rows = Sampler(SamplingParams(temperature=0.6, top_p=0.95, seed=0)), torch.randn(50, vocab)
    started = time.perf_counter()
    for row in rows:
        sampler.sample(row)
    return (time.perf_counter() - started) / len(rows) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=int, default=40, help="text to train the V3-sized BPE on")
    parser.add_argument("--repeat", type=int, default=5, help="walks per cell; the best is shown")
    parser.add_argument("--walks", type=int, default=40, help="random-logit answers per library checked for validity")
    args = parser.parse_args()
    vocabs = {"demo (653)": (AutoTokenizer.from_pretrained(demo_paths()[0]), 653),
              f"V3-size ({V3_LOGITS})": (v3_sized_tokenizer(args.corpus_mb), V3_LOGITS)}
    if XGrammar not in LIBRARIES:
        print("xgrammar is not installed (pip install xgrammar): timing llguidance alone")
    print(f"torch threads {torch.get_num_threads()}; microseconds per token, median over the answer's tokens "
          f"(best of {args.repeat} walks, the libraries interleaved); library = mask + accept")
    print(f"{'vocab':<20}{'library':<12}{'grammar':<15}{'tokens':>7}{'setup ms':>9}{'ready ms':>9}{'mask':>8}"
          f"{'accept':>8}{'library':>8}{'p90':>8}{'apply':>8}")
    for vocab_name, (tokenizer, vocab) in vocabs.items():
        libs, setup_ms = [], {}
        for lib_class in LIBRARIES:
            started = time.perf_counter()
            libs.append(lib_class(tokenizer, vocab))
            setup_ms[libs[-1].name] = (time.perf_counter() - started) * 1e3
        for grammar, (lark, target) in workloads(tokenizer).items():
            runs = {lib.name: [] for lib in libs}
            for _ in range(args.repeat):
                for lib in libs:
                    runs[lib.name].append(walk(lib, lark, target, vocab))
            for lib in libs:
                best = {key: min(r[key] for r in runs[lib.name]) for key in runs[lib.name][0]}
                print(f"{vocab_name:<20}{lib.name:<12}{grammar:<15}{len(target):>7}{setup_ms[lib.name]:>9.0f}"
                      f"{best['ready'] / 1e3:>9.1f}{best['mask']:>8.1f}{best['accept']:>8.1f}{best['library']:>8.1f}"
                      f"{best['p90']:>8.1f}{best['apply']:>8.1f}")
    tokenizer, vocab = vocabs["demo (653)"]
    for lib_class in LIBRARIES:
        lib = lib_class(tokenizer, vocab)
        bad, unfinished = invalid_answers(lib, json_grammar(SCHEMA), vocab, tokenizer.eos_token_id,
                                          tokenizer.decode, args.walks)
        print(f"{lib.name}: {bad} of {args.walks - unfinished} random-logit answers are not valid JSON for the "
              f"schema ({unfinished} did not finish in 400 tokens)")
    print(f"demo model decode step (q4_k_m, this machine): {demo_decode_ms():.2f} ms")
    print(f"sampler on a {V3_LOGITS}-entry row (temperature + top_p): {sampler_ms(V3_LOGITS):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
