"""MLA prefill attention: on the GPU the absorbed form against the expanded one, on the CPU the
native causal kernel against torch's masked matmuls (mla.py).

    python benchmarks/mla_prefill.py --gguf FILE [--tokens 512,4096] [--context 0,8192] [--reps 5]
    python benchmarks/mla_prefill.py --cpu [--tokens 128,512] [--context 0,512,4096] [--threads N]

GPU (--gguf): layer 0's attention of FILE, placed by the GPU rules, runs a chunk of --tokens tokens
after --context cache rows, in each form; printed: ms per chunk (the whole layer, linears
included), the expanded form's speed-up, and each form's attention multiply-adds (scores +
weighted sum, causal half counted; the expansion matmuls counted as the expanded form's own) over
that time. Also the raw fused-attention call at those widths under each SDPA backend torch offers,
with values as they are (v = 128) and padded to the key width (flash attention wants equal
widths), to show which backend the layer gets.

CPU (--cpu): the attention between the absorbed products alone, at DeepSeek-V3's widths (128 heads,
576-wide latent rows): kernels.mla_prefill_attention (each token scores its causal prefix only, on
the kernel pool) against torch (every key scored, then masked); ms and GFLOP/s of each one's own
multiply-adds. mla.py picks the native kernel for long first chunks (NATIVE_PREFILL_MIN_TOKENS), and
for every chunk where a short timing at startup finds it faster (mla.native_prefill_everywhere).
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

from ktransformers import kernels
from ktransformers.models import mla
from ktransformers.models.loader import load_model
from ktransformers.optimize.optimize import default_rules_path


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs after one warm-up, synchronized."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_attention(tokens, contexts, reps: int, heads=128, kv_lora=512, rope=64):
    """The CPU rules' two ways through MLAttention._attend for a chunk of prefill queries."""
    print(f"this CPU's choice for every prefill chunk: {'native' if mla.native_prefill_everywhere() else 'torch'} "
          f"(mla.native_prefill_everywhere)")
    width = kv_lora + rope
    print(f"CPU, {kernels.cpu_features()['threads']} kernel threads, {torch.get_num_threads()} torch threads; "
          f"{heads} heads, {width}-wide rows, float32")
    print(f"{'tokens':>6} {'context':>7} {'native ms':>10} {'torch ms':>9} {'native GFLOP/s':>15} {'torch GFLOP/s':>14} "
          f"{'native / torch time':>20}")
    for context in contexts:
        for n in tokens:
            query, keys = torch.randn(heads * n, width), torch.randn(context + n, width)
            native = timed(lambda: kernels.mla_prefill_attention(query, keys, n, kv_lora, 0.1), reps)
            matmuls = timed(lambda: mla.masked_attention(query, keys, keys[:, :kv_lora], context, n, 0.1), reps)
            per_pair = 2 * (width + kv_lora)  # flops of one query row against one key: score + weighted sum
            flops_native = heads * n * (context + (n + 1) / 2) * per_pair
            flops_torch = heads * n * (context + n) * per_pair
            print(f"{n:6d} {context:7d} {native * 1e3:10.2f} {matmuls * 1e3:9.2f} {flops_native / native / 1e9:15.1f} "
                  f"{flops_torch / matmuls / 1e9:14.1f} {native / matmuls:20.2f}")


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
    parser.add_argument("--gguf", help="GPU: the file whose layer 0 attention runs")
    parser.add_argument("--cpu", action="store_true", help="the CPU attention kernels instead (no file needed)")
    parser.add_argument("--threads", type=int, default=None, help="CPU: kernel pool threads")
    parser.add_argument("--tokens", default="512,4096")
    parser.add_argument("--context", default="0,8192")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    if args.cpu:
        if args.threads:
            kernels.set_num_threads(args.threads)
        return cpu_attention(tokens, contexts, args.reps)
    if not args.gguf:
        parser.error("--gguf FILE (GPU), or --cpu")
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
