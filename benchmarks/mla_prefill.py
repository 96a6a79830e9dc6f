"""One MLA layer's prefill chunk on the GPU: the absorbed form against the expanded one (mla.py).

    python benchmarks/mla_prefill.py --gguf FILE [--tokens 512,4096] [--context 0,8192] [--reps 5]

Layer 0's attention of FILE, placed by the GPU rules, runs a chunk of --tokens tokens after
--context cache rows, in each form; printed: ms per chunk (the whole layer, linears included), the
expanded form's speed-up, and each form's attention multiply-adds (scores + weighted sum, causal
half counted; the expansion matmuls counted as the expanded form's own) over that time. Also the raw fused-attention call at those
widths under each SDPA backend torch offers, with values as they are (v = 128) and padded to the
key width (flash attention wants equal widths), to show which backend the layer gets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ktransformers  # noqa: F401
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ktransformers.models.loader import load_model
from ktransformers.optimize.optimize import default_rules_path


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs after one warm-up, synchronized."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_macs(attn, n_tokens: int, n_keys: int, expanded: bool) -> float:
    """Multiply-adds of the attention core (causal: each query sees its prefix of the context)."""
    pairs = attn.n_heads * n_tokens * (n_keys - n_tokens / 2)
    if not expanded:
        return pairs * (2 * attn.kv_lora_rank + attn.rope_dim)
    expansion = n_keys * attn.n_heads * attn.kv_lora_rank * (attn.nope_dim + attn.v_dim)
    return pairs * (attn.nope_dim + attn.rope_dim + attn.v_dim) + expansion


def sdpa_backends(attn, n_tokens: int, n_keys: int, reps: int):
    h, qk, v = attn.n_heads, attn.nope_dim + attn.rope_dim, attn.v_dim
    q = torch.randn(1, h, n_tokens, qk, device="cuda", dtype=attn.dtype)
    k = torch.randn(1, h, n_keys, qk, device="cuda", dtype=attn.dtype)
    values = {"v=%d" % v: torch.randn(1, h, n_keys, v, device="cuda", dtype=attn.dtype)}
    values["v padded to %d" % qk] = F.pad(values["v=%d" % v], (0, qk - v))
    mask = causal_lower_right(n_tokens, n_keys)
    for label, vv in values.items():
        for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def call():
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, scale=attn.scale)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, scale=attn.scale)
            try:
                ms = timed(call, reps) * 1e3
                print(f"    sdpa {label:16s} {backend.name if backend else 'default':20s} {ms:8.2f} ms")
            except RuntimeError as e:
                print(f"    sdpa {label:16s} {backend.name:20s} not available ({str(e).splitlines()[0][:60]})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--tokens", default="512,4096")
    parser.add_argument("--context", default="0,8192")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    max_context = max(tokens) + max(contexts)
    model = load_model(args.gguf, device="cuda", optimize_config_path=default_rules_path(True),
                       max_context=max_context).model
    attn = model.model.layers[0].self_attn
    shipped = attn.expanded_min_tokens
    print(f"{torch.cuda.get_device_name()}: layer 0 attention, {attn.n_heads} heads, {attn.dtype}, "
          f"expanded form from {shipped} tokens")
    print(f"{'tokens':>6} {'context':>7} {'absorbed ms':>12} {'expanded ms':>12} {'speed-up':>8} "
          f"{'absorbed TMAC/s':>16} {'expanded TMAC/s':>16}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for context in contexts:
            for n in tokens:
                x = torch.randn(n, attn.kv_a_proj_with_mqa.in_features, device="cuda", generator=gen).to(attn.dtype)
                ms = {}
                for form, threshold in (("absorbed", None), ("expanded", 1)):
                    attn.expanded_min_tokens = threshold
                    if form == "expanded" and not attn._expands(n, context + n):
                        ms[form] = float("nan")
                        continue
                    ms[form] = timed(lambda: attn(x, context), args.reps) * 1e3
                rate = {f: attention_macs(attn, n, context + n, f == "expanded") / (ms[f] * 1e-3) / 1e12 for f in ms}
                print(f"{n:6d} {context:7d} {ms['absorbed']:12.2f} {ms['expanded']:12.2f} "
                      f"{ms['absorbed'] / ms['expanded']:7.2f}x {rate['absorbed']:16.1f} {rate['expanded']:16.1f}")
        attn.expanded_min_tokens = shipped
        for n in tokens:
            print(f"  fused attention alone, {n} queries over {n} keys:")
            sdpa_backends(attn, n, n, args.reps)


if __name__ == "__main__":
    main()
