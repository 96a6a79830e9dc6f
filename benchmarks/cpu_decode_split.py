"""Where a CPU-only decode step spends its time, per module, at DeepSeek-V3's real widths.

    python benchmarks/cpu_decode_split.py [--mix q4_k_m] [--layers 3] [--dense 1] [--context 128]
        [--steps 8] [--override key=value]

A synthetic model (benchmarks/synthetic_model.py) placed by the CPU rules decodes --steps tokens
through the model's eager forward (the CPU serving path) after a --context-token prefill. Forward
hooks time every placed module (weights come from DRAM: a step reads far more than the L3 holds),
and each one's weight bytes over its time is printed next to the memory bandwidth the native
streaming probe measures. "self" rows are a container's time outside its timed children (for
self_attn: the torch part of MLA, i.e. absorbed kv_b matmuls, rope, scores, softmax, copies).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import torch

sys.path.insert(0, str(Path(__file__).parent))
import synthetic_model  # noqa: E402
from decode import memory_bandwidth  # noqa: E402


def weight_bytes(module) -> int:
    """Bytes a one-token call of a linear-like module streams (0 for norms, containers, experts)."""
    raw = getattr(module, "raw", None)  # cpu_quant linears keep the GGUF blocks
    if raw is not None:
        return raw.numel()
    weight = getattr(module, "weight", None)
    return weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0


def self_bytes(module, uncalled=()) -> int:
    """Weight bytes a container streams in its own code: MLA's absorbed W_UK and W_UV, and the weights of
    child linears it ran without calling them as modules (`uncalled`: a decode step's grouped q_a + kv_a,
    gate + up, one native call)."""
    total = sum(weight_bytes(child) for child in uncalled)
    kv_b = getattr(module, "kv_b_proj", None)
    if kv_b is None:
        return total
    return total + sum(w.nbytes if hasattr(w, "nbytes") and not isinstance(w, torch.Tensor)
                       else w.numel() * w.element_size() for w in (kv_b.w_uk, kv_b.w_uv))


def short_name(name: str) -> str:
    """model.layers.7.self_attn.q_a_proj -> L7.self_attn.q_a_proj"""
    return name.replace("model.layers.", "L", 1) if name.startswith("model.layers.") else name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mix", default="q4_k_m")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dense", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=INT")
    parser.add_argument("--fused-kv-b", action="store_true", help="one attn_kv_b (older files) instead of attn_k_b + attn_v_b")
    parser.add_argument("--gguf", help="profile this file (loaded with load_model) instead of a synthetic model")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.override)}

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bandwidth = memory_bandwidth(256 if overrides else 1024)
    if args.gguf:
        from ktransformers.models.loader import load_model

        model = load_model(args.gguf, device="cpu", max_context=args.context + args.steps + 8).model
        vocab = model.config.vocab_size
    else:
        model, small, _ = synthetic_model.build_model(args.dense, args.layers - args.dense, args.mix, False,
                                                      args.context + args.steps + 8, kv_b_split=not args.fused_kv_b,
                                                      **overrides)
        vocab = small["vocab_size"]
    model(torch.randint(0, vocab, (1, args.context)), 0)

    timed = {name: m for name, m in model.named_modules()
             if hasattr(m, "placement") or name.endswith(("self_attn", ".mlp", "shared_experts"))}
    seconds = collections.defaultdict(float)
    starts = {}
    for name, module in timed.items():
        module.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o, name=name: seconds.__setitem__(name, seconds[name] + time.perf_counter() - starts[name]))

    model(torch.tensor([[1]]), args.context)  # warm-up step, not counted
    seconds.clear()
    steps = []
    for i in range(args.steps):
        start = time.perf_counter()
        model(torch.tensor([[2 + i]]), args.context + 1 + i)
        steps.append(time.perf_counter() - start)

    from ktransformers.models.layers import MoE

    moe = sum(isinstance(layer.mlp, MoE) for layer in model.model.layers)
    what = Path(args.gguf).name if args.gguf else args.mix
    print(f"{what}: {len(model.model.layers) - moe} dense + {moe} MoE layers, context {args.context}; "
          f"step median {statistics.median(steps) * 1e3:.2f} ms; memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'module':48s} {'ms/step':>8s} {'MB':>8s} {'GB/s':>7s}")
    def row(label, ms, nbytes):
        rate = f"{nbytes / ms / 1e6:7.1f}" if nbytes and ms > 0 else ""
        print(f"{label:48s} {ms:8.3f} {nbytes / 1e6 if nbytes else 0:8.1f} {rate:>7s}")

    for name, module in timed.items():
        if name not in seconds:
            continue  # never called as a module (MLA's kv_b holder: its bytes show on self_attn's self row)
        ms = seconds[name] / args.steps * 1e3
        children = [f"{name}.{c}" for c, _ in module.named_children() if f"{name}.{c}" in seconds]
        uncalled = [m for c, m in module.named_children() if f"{name}.{c}" in timed and f"{name}.{c}" not in seconds]
        row(short_name(name), ms, weight_bytes(module))
        if children or uncalled:
            own_ms = ms - sum(seconds[c] for c in children) / args.steps * 1e3
            row(short_name(name) + " (self)", own_ms, self_bytes(module, uncalled))


if __name__ == "__main__":
    main()
