"""Prefill and decode speed of DeepSeek-V3 at its real widths, extrapolated to 61 layers, next to the roofline.

    python benchmarks/decode.py --mode hybrid --mix q4_k_m,ud-iq1_s [--layers 3] [--dense 1]
        [--prefill 128,1024,4096] [--decode 32] [--no-cuda-graph] [--gpu-prefill-min 512] [--threads N]
        [--json out.json] [--override key=value]

A synthetic model (benchmarks/synthetic_model.py: random valid blocks, real DeepSeek-V3 widths,
`--dense` dense + the rest MoE layers) is placed by the GPU rules (--mode hybrid: attention,
shared experts, dense layers, lm_head on cuda in bf16; routed experts on the CPU kernels) or the
CPU rules (--mode cpu: cpu_quant everywhere).

Times are split per dense layer, per MoE layer and the fixed embedding + lm_head part (sync
after each part), and scaled to 3 dense + 58 MoE layers; for decode the split's proportions are
applied to the unsynchronised step time (in CPU mode the model's eager forward, which CPU-only
serving runs; on cuda the StaticDecoder step with CUDA graphs). Roofline: routed-expert bytes per token of the full
model (top-8 x gate/up/down at the mix's per-layer types, 58 layers) / the memory bandwidth the
kernels' streaming probe measures in the same run. Kernel roofline: the same matrices at the speed the
CPU kernels compute them when the weights sit in the caches (one token; for the 1-2 bit codebook
types this, not memory, is the limit); the ratio is taken against the lower of the two. In hybrid mode, prefill chunks of at least
--gpu-prefill-min tokens run the routed experts on the GPU from streamed blocks; one such layer
call is also split into upload / dequantization / matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import synthetic_model  # noqa: E402

from ktransformers import kernels  # noqa: E402
from ktransformers.models.hybrid_moe import enable_overlap  # noqa: E402
from ktransformers.util.cuda_graph import StaticDecoder  # noqa: E402

FULL_DENSE, FULL_MOE = 3, 58


def hardware() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "kernel_threads": kernels.num_threads(),
            "isa": kernels.cpu_features()["isa"], "gpu": gpu, "torch": torch.__version__}


def memory_bandwidth(size_mb: int = 1024) -> float:
    """Bytes/s of the native multi-threaded streaming read over 2 x size_mb (best of 5)."""
    mod = kernels.require()
    buf = torch.ones(size_mb * 2 << 20, dtype=torch.uint8)
    mod.stream_sum(buf.numpy())
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mod.stream_sum(buf.numpy())
        best = min(best, time.perf_counter() - start)
    return buf.numel() / best


def kernel_roofline(full: dict, mix: str, repeats: int = 10) -> tuple[float, dict]:
    """Tokens/s if every routed-expert matrix of a token ran at the kernels' in-cache decode speed,
    and that speed (bytes/s) per (type, rows, cols). Four matrices are stacked per call, as the fused
    MoE hands the pool several experts at once, so the per-call overhead stays small."""
    seconds, rates = 0.0, {}
    for (ggml_type, rows, cols), count in synthetic_model.routed_matrices_per_token(full, mix).items():
        raw = synthetic_model.repeated_blocks(ggml_type, 4 * rows, cols, np.random.default_rng(0))
        raw = torch.as_tensor(raw).reshape(-1)
        x = torch.randn(1, cols)
        calls = lambda: [kernels.quant_linear(x, raw, ggml_type, 4 * rows, cols) for _ in range(repeats)]  # noqa: E731
        calls()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            calls()
            best = min(best, (time.perf_counter() - start) / repeats / 4)
        rates[f"{ggml_type.name} {rows}x{cols}"] = raw.numel() / 4 / best
        seconds += count * best
    return 1.0 / seconds, rates


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class LayerTimer:
    """Forward hooks: seconds per layer (synchronised), plus the whole call's time."""

    def __init__(self, model):
        self.model, self.times, self.handles = model, {}, []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._start))
            self.handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self._stop(i)))

    def _start(self, module, args):
        sync()
        self._t = time.perf_counter()

    def _stop(self, i):
        sync()
        self.times[i] = self.times.get(i, 0.0) + time.perf_counter() - self._t

    def remove(self):
        for h in self.handles:
            h.remove()


def extrapolate(fixed: float, dense: list[float], moe: list[float]) -> float:
    return fixed + FULL_DENSE * statistics.mean(dense) + FULL_MOE * statistics.mean(moe)


def measure_prefill(model, n_dense: int, length: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, length))
    timer = LayerTimer(model)
    sync()
    start = time.perf_counter()
    model(ids, 0)
    sync()
    total = time.perf_counter() - start
    timer.remove()
    layers = [timer.times[i] for i in range(len(model.model.layers))]
    dense, moe = layers[:n_dense], layers[n_dense:]
    full = extrapolate(total - sum(layers), dense, moe)
    return {"tokens": length, "seconds_measured": total, "dense_layer_s": statistics.mean(dense),
            "moe_layer_s": statistics.mean(moe), "seconds_61_layers": full, "tokens_per_s_61_layers": length / full}


def measure_decode(model, n_dense: int, n_tokens: int, context: int, vocab: int, use_graph: bool) -> dict:
    """Decode n_tokens after a `context`-token prefill through StaticDecoder (graphs if use_graph and cuda)."""
    model(torch.randint(0, vocab, (1, context)), 0)
    decoder = StaticDecoder(model, use_cuda_graph=use_graph)
    tokens = torch.randint(0, vocab, (n_tokens + 2,)).tolist()
    decoder.step(tokens[0], context)  # capture / warm up
    steps = []
    for i in range(n_tokens):
        sync()
        start = time.perf_counter()
        decoder.step(tokens[i + 1], context + 1 + i)
        steps.append(time.perf_counter() - start)
    step = statistics.median(steps)

    profile, n_prof = {}, max(4, n_tokens // 4)
    for i in range(n_prof):  # the split, with a sync after every part
        decoder.step(tokens[-1], context + 1 + i)
    profile = {}
    for i in range(n_prof):
        decoder.step(tokens[-1], context + 1 + i, profile)
    per = {k: v / n_prof for k, v in profile.items()}
    n_moe = len(model.model.layers) - n_dense
    dense = per.get("dense", 0.0) / max(n_dense, 1)
    moe = (per.get("moe_gpu", 0.0) + per.get("experts", 0.0) + per.get("combine", 0.0)) / max(n_moe, 1)
    fixed = per.get("embed", 0.0) + per.get("head", 0.0)
    profiled_small = fixed + n_dense * dense + n_moe * moe
    full = step * extrapolate(fixed, [dense], [moe]) / profiled_small

    # the eager model path (overlapped MoE, no static decoder): what CPU-only serving runs, so it is
    # the headline there; on cuda a comparison
    cpu_only = not torch.cuda.is_available() or decoder.device.type == "cpu"
    eager = []
    for i in range(n_tokens if cpu_only else min(n_tokens, 8)):
        sync()
        start = time.perf_counter()
        model(torch.tensor([[tokens[i]]]), context + 1 + i)
        sync()
        eager.append(time.perf_counter() - start)
    if cpu_only:
        full *= statistics.median(eager) / step
        step = statistics.median(eager)
    return {"tokens": n_tokens, "context": context, "cuda_graph": decoder.use_graphs, "step_s": step,
            "eager_step_s": statistics.median(eager),
            "split_per_token_s": {k: round(v, 6) for k, v in per.items()},
            "dense_layer_s": dense, "moe_layer_s": moe, "moe_experts_s": per.get("experts", 0.0) / max(n_moe, 1),
            "fixed_s": fixed, "step_s_61_layers": full, "tokens_per_s_61_layers": 1.0 / full}


def profile_gpu_prefill_route(model, n_tokens: int) -> dict:
    """Seconds per MoE layer of the GPU prefill route's parts for n_tokens random tokens: uploading
    all chunks, decoding them to bf16 (after upload), and the whole call."""
    moe = next(layer.mlp for layer in model.model.layers if getattr(layer.mlp, "prefill_experts", None))
    streamed = moe.prefill_experts
    hidden, k = streamed.hidden, model.config.num_experts_per_tok
    x = torch.randn(n_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(streamed.n_experts)[:k] for _ in range(n_tokens)]).cuda()
    weights = torch.rand(n_tokens, k, device="cuda")
    chunks = [(lo, min(lo + streamed.per_chunk, streamed.n_experts))
              for lo in range(0, streamed.n_experts, streamed.per_chunk)]

    def timed(fn):
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def uploads():
        for i, (lo, hi) in enumerate(chunks):
            streamed._upload(lo, hi, i % 2)

    def upload_and_decode():
        for i, (lo, hi) in enumerate(chunks):
            streamed._decode(streamed._upload(lo, hi, i % 2), hi - lo, i % 2)

    upload = timed(uploads)
    decode = timed(upload_and_decode) - upload
    full = timed(lambda: streamed(x, ids, weights))
    return {"tokens": n_tokens, "upload_s": upload, "dequant_s": decode, "matmul_s": full - upload - decode,
            "total_s": full, "layer_bytes": sum(raw.numel() for raw in streamed.stacks)}


def run_mix(args, mix: str, bandwidth: float, hw: dict) -> dict:
    cuda = args.mode == "hybrid"
    n_dense, n_moe = args.dense, args.layers - args.dense
    start = time.perf_counter()
    model, small, full = synthetic_model.build_model(n_dense, n_moe, mix, cuda, args.max_context, **args.override)
    enable_overlap(model, args.gpu_prefill_min if args.gpu_prefill_min > 0 else None)
    build_s = time.perf_counter() - start
    print(f"[{args.mode} {mix}] built {n_dense} dense + {n_moe} MoE layers in {build_s:.1f} s", flush=True)
    vocab = small["vocab_size"]

    model(torch.randint(0, vocab, (1, 8)), 0)  # warm up lazily initialised paths
    if cuda and args.gpu_prefill_min > 0:  # and the GPU prefill route (its pinned staging buffers)
        model(torch.randint(0, vocab, (1, args.gpu_prefill_min)), 0)
    prefill = []
    for length in args.prefill:
        prefill.append(measure_prefill(model, n_dense, length, vocab))
        p = prefill[-1]
        print(f"[{args.mode} {mix}] prefill {length:5d}: dense {p['dense_layer_s'] * 1e3:.1f} ms/layer, "
              f"MoE {p['moe_layer_s'] * 1e3:.1f} ms/layer -> {p['tokens_per_s_61_layers']:.1f} tok/s at 61 layers",
              flush=True)
    decode = measure_decode(model, n_dense, args.decode, args.context, vocab, not args.no_cuda_graph)
    route = None
    if cuda and args.gpu_prefill_min > 0:
        with torch.inference_mode():
            route = profile_gpu_prefill_route(model, max(args.prefill))
        print(f"[{args.mode} {mix}] GPU prefill route, one MoE layer, {route['tokens']} tokens: upload "
              f"{route['layer_bytes'] / 1e9:.2f} GB in {route['upload_s'] * 1e3:.0f} ms "
              f"({route['layer_bytes'] / route['upload_s'] / 1e9:.1f} GB/s), dequant {route['dequant_s'] * 1e3:.0f} ms, "
              f"matmuls {route['matmul_s'] * 1e3:.0f} ms, total {route['total_s'] * 1e3:.0f} ms", flush=True)
    bytes_per_token = synthetic_model.routed_bytes_per_token(full, mix)
    roofline = bandwidth / bytes_per_token
    compute_roofline, kernel_rates = kernel_roofline(full, mix)
    result = {"mode": args.mode, "mix": mix, "layers": [n_dense, n_moe], "build_s": build_s, "prefill": prefill,
              "decode": decode, "gpu_prefill_route": route, "routed_bytes_per_token": bytes_per_token, "roofline_tokens_per_s": roofline,
              "kernel_roofline_tokens_per_s": compute_roofline,
              "kernel_in_cache_GBps": {k: round(v / 1e9, 1) for k, v in kernel_rates.items()},
              "ratio": decode["tokens_per_s_61_layers"] / roofline,
              "ratio_to_lower_roofline": decode["tokens_per_s_61_layers"] / min(roofline, compute_roofline),
              "expert_bandwidth_GBps": bytes_per_token / FULL_MOE / 1e9 / max(decode["moe_experts_s"], 1e-9)}
    print(f"[{args.mode} {mix}] decode: {decode['step_s'] * 1e3:.1f} ms/step here (eager {decode['eager_step_s'] * 1e3:.1f}),"
          f" split {decode['split_per_token_s']}; MoE layer {decode['moe_layer_s'] * 1e3:.2f} ms of which experts "
          f"{decode['moe_experts_s'] * 1e3:.2f} ms ({result['expert_bandwidth_GBps']:.1f} GB/s); kernels in cache "
          f"{result['kernel_in_cache_GBps']} GB/s", flush=True)
    del model
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("cpu", "hybrid"), default="hybrid" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mix", default="q4_k_m,ud-iq1_s")
    parser.add_argument("--layers", type=int, default=3, help="synthetic layers in all (dense + MoE)")
    parser.add_argument("--dense", type=int, default=1, help="how many of them are dense")
    parser.add_argument("--prefill", default="128,1024,4096")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--context", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--max-context", type=int, default=4224)
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--gpu-prefill-min", type=int, default=512,
                        help="hybrid: prefill chunks this long run routed experts on the GPU (0: never)")
    parser.add_argument("--threads", type=int, help="CPU kernel threads (default: KT_CPU_INFER or all cores)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                        help="shrink a config width for smoke tests, e.g. n_routed_experts=16")
    args = parser.parse_args(argv)
    if args.mode == "hybrid" and not torch.cuda.is_available():
        parser.error("--mode hybrid needs CUDA; use --mode cpu")
    if not 0 < args.dense < args.layers:
        parser.error("--dense must be at least 1 and leave at least one MoE layer")
    args.prefill = [int(x) for x in args.prefill.split(",") if x]
    if max(args.prefill + [args.context + args.decode + 8]) > args.max_context:
        parser.error("--max-context must cover the longest prefill and context + decode")
    args.override = {k: int(v) for k, v in (item.split("=", 1) for item in args.override)}

    if args.threads:
        kernels.set_num_threads(args.threads)
    hw = hardware()
    bandwidth = memory_bandwidth(args.bandwidth_mb)
    print(f"hardware: {hw}; measured CPU memory bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    results = [run_mix(args, mix, bandwidth, hw) for mix in args.mix.split(",")]

    print(f"\n| hardware | mode | mix | decode tok/s (61 layers) | bandwidth roofline tok/s | ratio | "
          "kernel roofline tok/s | ratio to the lower | " + " | ".join(f"prefill {n} tok/s" for n in args.prefill) + " |")
    print("|---" * (8 + len(args.prefill)) + "|")
    for r in results:
        print(f"| {hw['cpu']} ({hw['kernel_threads']} thr) + {hw['gpu']} | {r['mode']} | {r['mix']} | "
              f"{r['decode']['tokens_per_s_61_layers']:.2f} | {r['roofline_tokens_per_s']:.2f} | {r['ratio']:.0%} | "
              f"{r['kernel_roofline_tokens_per_s']:.2f} | {r['ratio_to_lower_roofline']:.0%} | "
              + " | ".join(f"{p['tokens_per_s_61_layers']:.1f}" for p in r["prefill"]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw, "bandwidth_Bps": bandwidth, "results": results}, indent=1))


if __name__ == "__main__":
    main()
