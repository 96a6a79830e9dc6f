"""Per-token cost of the generation loop around the model: sampling and detokenizing.

    python benchmarks/generation_overhead.py [--vocab 129280] [--tokens 200] [--device cpu]

Every decode step the sampler reads one row of float32 logits (DeepSeek-V3: 129280 entries,
about 0.5 MB) and, for top-p, sorts it. This prints the time per token for each sampling
mode, the logits bytes read per second, and the machine's memory-copy bandwidth, so the
overhead can be set against a model step (tens of ms for DeepSeek-V3 on a workstation).
The detokenizer is timed on a byte-level tokenizer over Chinese text (several tokens per
character).
"""

import argparse
import time

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ktransformers.util.sampling import Sampler, SamplingParams
from ktransformers.util.text_stream import IncrementalDetokenizer

MODES = {
    "greedy": SamplingParams(temperature=0),
    "temperature": SamplingParams(temperature=0.6, seed=0),
    "top_p 0.95": SamplingParams(temperature=0.6, top_p=0.95, seed=0),
    "top_k 40 + min_p": SamplingParams(temperature=0.6, top_k=40, min_p=0.05, seed=0),
    "penalties + top_p": SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.1,
                                        presence_penalty=0.5, frequency_penalty=0.5, seed=0),
}


def copy_bandwidth_gbs(device) -> float:
    """GB/s moved (read + write) by cloning 256 MB, best of 3."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        src.clone()
        if src.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def time_sampler(params, logits_rows) -> float:
    sampler = Sampler(params, prompt_ids=range(100))
    sampler.sample(logits_rows[0])  # warm up
    start = time.perf_counter()
    for row in logits_rows:
        sampler.sample(row)
    return (time.perf_counter() - start) / len(logits_rows)


def time_detokenizer(n_tokens: int) -> tuple[float, int]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=300,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = fast.encode("深度求索 the answer 你好世界 🙂 " * 200, add_special_tokens=False)[:n_tokens]
    detok = IncrementalDetokenizer(fast)
    start = time.perf_counter()
    for token in ids:
        detok.push(token)
    return (time.perf_counter() - start) / len(ids), len(ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"memory copy bandwidth {copy_bandwidth_gbs(device):.1f} GB/s")
    # LLM-like rows: a handful of likely tokens over a long flat tail.
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(args.tokens, args.vocab, generator=gen) * 1.5
    rows[:, torch.randint(args.vocab, (20,), generator=gen)] += torch.rand(20, generator=gen) * 10 + 8
    rows = rows.to(device)
    row_bytes = args.vocab * 4
    print(f"{'mode':<20}{'ms/token':>10}{'tokens/s':>12}{'logits GB/s':>14}")
    for name, params in MODES.items():
        seconds = time_sampler(params, rows)
        print(f"{name:<20}{seconds * 1e3:>10.3f}{1 / seconds:>12.0f}{row_bytes / seconds / 1e9:>14.2f}")
    seconds, n = time_detokenizer(args.tokens)
    print(f"{'detokenizer':<20}{seconds * 1e3:>10.3f}{1 / seconds:>12.0f}{'':>14}  ({n} tokens)")


if __name__ == "__main__":
    main()
