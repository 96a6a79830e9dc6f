"""Throughput of the native CPU kernels, next to the memory bandwidth measured in the same run.

    python benchmarks/cpu_kernels.py [--threads N] [--types Q4_K,Q8_0,...] [--size-mb 1024]

* bandwidth: the extension's multi-threaded streaming read (and, for comparison, a torch sum)
  over a buffer of 2 x size-mb;
* decode (M=1): weight bytes/s over size-mb of weights, cycled through several matrices so no
  weight stays in the last-level cache, as a fraction of the measured bandwidth;
* in cache: the same decode on one 4096x7168 matrix read over and over (it stays in the L2/L3
  caches of a server CPU), i.e. what the kernel computes per second when DRAM is not the limit;
* prefill (M=512): GFLOP/s (2*M*N*K per call) on one matrix;
* fused MoE decode with DeepSeek-V3 widths (hidden 7168, intermediate 2048, top-8), with as
  many experts as fit in size-mb: expert bytes streamed per second;
* MLA decode's absorbed products (DeepSeek-V3: 128 heads, W_UK [512x128] and W_UV [128x512] per
  head, float32 and bfloat16) between the quantized linears around them, as in a decode step:
  torch.bmm (weight on the left) vs kernels.head_linear on float weights and on the GGUF's blocks
  (attn_k_b Q8_0 or Q5_0, attn_v_b Q4_K), product time per layer and GB/s.
"""

import argparse
import time

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import numpy as np
import torch

from ktransformers import kernels
from ktransformers.gguf import GGMLType, random_quant_bytes, resolve_type, row_nbytes

HIDDEN, MOE_INTERMEDIATE, TOP_K = 7168, 2048, 8
FLOAT_TORCH = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_bytes(ggml_type, rows, cols, rng):
    if ggml_type in FLOAT_TORCH:
        return torch.randn(rows, cols).to(FLOAT_TORCH[ggml_type]).view(torch.uint8).reshape(-1).numpy()
    return random_quant_bytes(ggml_type, (rows, cols), rng, scale=0.02)


def filled(ggml_type, total_rows, cols, rng, base_rows=512):
    """total_rows x cols of valid blocks: one random base tiled (contents do not change speed)."""
    base = random_bytes(ggml_type, base_rows, cols, rng)
    reps = -(-total_rows // base_rows)
    return torch.from_numpy(np.tile(base, reps)[: total_rows * row_nbytes(ggml_type, cols)].copy())


def measure_bandwidth(size_mb):
    buf = torch.ones(size_mb * 2 << 20, dtype=torch.uint8)
    mod = kernels.require()
    mod.stream_sum(buf.numpy())  # fault the pages in
    native = buf.numel() / best_time(lambda: mod.stream_sum(buf.numpy()), 5)
    as_i64 = buf.view(torch.int64)
    torch_sum = buf.numel() / best_time(lambda: as_i64.sum(), 3)
    return native, torch_sum


def decode_set(ggml_type, N, size_mb, rng, max_count=None):
    """Enough N x HIDDEN matrices to fill size_mb (at least 2, at most max_count), one token, and a
    pass decoding the token through every matrix -> (weights [count, matrix bytes], x, decode_pass)."""
    matrix_bytes = N * row_nbytes(ggml_type, HIDDEN)
    count = (size_mb << 20) // matrix_bytes
    count = max(2, count if max_count is None else min(max_count, count))
    weights = filled(ggml_type, N * count, HIDDEN, rng).view(count, matrix_bytes)
    x = torch.randn(1, HIDDEN)

    def decode_pass():
        for w in weights:
            kernels.quant_linear(x, w, ggml_type, N, HIDDEN)

    return weights, x, decode_pass


def decode_and_prefill(ggml_type, size_mb, bandwidth, prefill_m, rng):
    N, K = 4096, HIDDEN
    weights, x, decode_pass = decode_set(ggml_type, N, size_mb, rng)
    count, matrix_bytes = weights.shape
    decode_pass()
    t = best_time(decode_pass, 7)
    decode_bps = weights.numel() / t
    hot_calls = lambda: [kernels.quant_linear(x, weights[0], ggml_type, N, K) for _ in range(10)]  # noqa: E731
    hot_calls()
    hot_bps = 10 * matrix_bytes / best_time(hot_calls, 5)
    xs = torch.randn(prefill_m, K)
    kernels.quant_linear(xs, weights[0], ggml_type, N, K)
    tp = best_time(lambda: kernels.quant_linear(xs, weights[0], ggml_type, N, K), 2)
    return decode_bps, decode_bps / bandwidth, hot_bps, 2 * prefill_m * N * K / tp / 1e9, t / count * 1e3


def call_scaling(ggml_type, size_mb, rng):
    """Per-call decode time for growing matrices: the fit t = overhead + bytes / rate separates the
    fixed cost of a call (Python, thread wake-up, tail imbalance) from streaming."""
    points = []
    for N in (16, 512, 2048, 8192):
        weights, _, calls = decode_set(ggml_type, N, size_mb, rng, max_count=4096)
        count, matrix_bytes = weights.shape
        calls()
        points.append((matrix_bytes, best_time(calls, 3) / count))
        del weights, calls
    sizes, times = np.array(points).T
    rate, overhead = np.polyfit(sizes, times, 1)
    detail = ", ".join(f"{b / 2**20:.1f} MiB: {t * 1e6:.0f} us" for b, t in points)
    return overhead * 1e6, 1 / rate, detail


def moe_decode(types, size_mb, bandwidth, rng):
    gate_t, up_t, down_t = types
    expert_bytes = (MOE_INTERMEDIATE * (row_nbytes(gate_t, HIDDEN) + row_nbytes(up_t, HIDDEN))
                    + HIDDEN * row_nbytes(down_t, MOE_INTERMEDIATE))
    n_experts = max(TOP_K, (size_mb << 20) // expert_bytes)
    gate = filled(gate_t, n_experts * MOE_INTERMEDIATE, HIDDEN, rng)
    up = filled(up_t, n_experts * MOE_INTERMEDIATE, HIDDEN, rng)
    down = filled(down_t, n_experts * HIDDEN, MOE_INTERMEDIATE, rng)
    x = torch.randn(1, HIDDEN)
    w = torch.full((1, TOP_K), 1.0 / TOP_K)
    picks = [torch.from_numpy(rng.permutation(n_experts)[:TOP_K]).view(1, TOP_K) for _ in range(16)]

    def calls():
        for ids in picks:
            kernels.moe_forward(x, ids, w, gate, gate_t, up, up_t, down, down_t, n_experts, HIDDEN, MOE_INTERMEDIATE)

    calls()
    t = best_time(calls, 3) / len(picks)
    bps = TOP_K * expert_bytes / t
    return t * 1e3, bps, bps / bandwidth, n_experts


def mla_absorbed(dtype, n_layers, rng):
    """Per layer: q_b_proj -> W_UK product -> W_UV product -> o_proj (Q4_K linears), the products
    timed alone, over n_layers distinct weights so they stream from memory: torch.bmm and
    kernels.head_linear on float weights of `dtype`, and head_linear on the GGUF blocks a file holds
    (attn_k_b Q8_0 or Q5_0, the type a Q4_K_M file's 128-wide rows fall back to; attn_v_b Q4_K), as the
    CPU rules run them. -> {name: (ms, bytes/s)}."""
    H, C, D = 128, 512, 128
    q_b, o_proj = filled(GGMLType.Q4_K, H * 192, 1536, rng), filled(GGMLType.Q4_K, HIDDEN, H * D, rng)
    q, latent = torch.randn(H, 1, D), torch.randn(H, 1, C)
    floats = [(torch.randn(H, C, D).to(dtype), torch.randn(H, D, C).to(dtype)) for _ in range(n_layers)]
    blocks = {t: [(filled(t, H * C, D, rng), filled(GGMLType.Q4_K, H * D, C, rng)) for _ in range(n_layers)]
              for t in (GGMLType.Q8_0, GGMLType.Q5_0)}
    float_type = kernels.FLOAT_WEIGHT_TYPES[dtype]

    def native(weight, x, ggml_type):
        K = x.shape[2]
        raw = weight if weight.dtype == torch.uint8 else weight.view(torch.uint8).reshape(-1)
        return kernels.head_linear(x, raw, ggml_type, H, C if K == D else D, K)  # W_UK: C rows of D; W_UV: D of C

    variants = {
        "torch.bmm": (floats, lambda w, x, _: torch.bmm(w, x.to(w.dtype).transpose(1, 2)).float(), None),
        "head_linear": (floats, native, float_type),
        "head_linear Q8_0/Q4_K": (blocks[GGMLType.Q8_0], native, (GGMLType.Q8_0, GGMLType.Q4_K)),
        "head_linear Q5_0/Q4_K": (blocks[GGMLType.Q5_0], native, (GGMLType.Q5_0, GGMLType.Q4_K)),
    }
    results = {}
    for name, (weights, product, types) in variants.items():
        uk_type, uv_type = types if isinstance(types, tuple) else (types, types)

        def step():
            spent = 0.0
            for uk, uv in weights:
                kernels.quant_linear(torch.randn(1, 1536), q_b, GGMLType.Q4_K, H * 192, 1536)
                start = time.perf_counter()
                product(uk, q, uk_type)
                product(uv, latent, uv_type)
                spent += time.perf_counter() - start
                kernels.quant_linear(torch.randn(1, H * D), o_proj, GGMLType.Q4_K, HIDDEN, H * D)
            return spent / n_layers

        step()
        t = min(step() for _ in range(5))
        nbytes = sum(w.numel() * w.element_size() for w in weights[0])
        results[name] = (t * 1e3, nbytes / t)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: KT_CPU_INFER or physical cores)")
    parser.add_argument("--types", default=None, help="comma-separated ggml types (default: every supported type)")
    parser.add_argument("--size-mb", type=int, default=1024, help="weight bytes per decode measurement")
    parser.add_argument("--prefill-m", type=int, default=512)
    parser.add_argument("--moe-types", default="Q4_K,Q4_K,Q6_K;Q8_0,Q8_0,Q8_0",
                        help="gate,up,down types of the fused-MoE lines, ';'-separated")
    parser.add_argument("--scaling", action="store_true", help="also fit per-call overhead vs matrix size (first type)")
    parser.add_argument("--mla-layers", type=int, default=4, 
                        help="layers of W_UK/W_UV cycled in the MLA line (0: skip)")
    args = parser.parse_args()
    if args.threads:
        kernels.set_num_threads(args.threads)
    features = kernels.cpu_features()
    types = [resolve_type(t) for t in args.types.split(",")] if args.types else kernels.supported_types()
    rng = np.random.default_rng()

    native_bw, torch_bw = measure_bandwidth(args.size_mb)
    print(f"isa {features['isa']}, {features['threads']} threads, weights {args.size_mb} MiB per decode set")
    print(f"memory read bandwidth: native stream {native_bw / 1e9:.1f} GB/s, torch int64 sum {torch_bw / 1e9:.1f} GB/s")
    print(f"{'type':<8} {'decode GB/s':>11} {'of bw':>6} {'in cache GB/s':>13} {'ms/4096x7168':>13} {'prefill GFLOP/s':>16}")
    for t in types:
        bps, frac, hot_bps, gflops, ms = decode_and_prefill(t, args.size_mb, native_bw, args.prefill_m, rng)
        print(f"{t.name:<8} {bps / 1e9:>11.1f} {frac:>6.0%} {hot_bps / 1e9:>13.1f} {ms:>13.3f} {gflops:>16.1f}", flush=True)
    if args.scaling:
        overhead, rate, detail = call_scaling(types[0], args.size_mb, rng)
        print(f"{types[0].name} decode call time: {detail}; fit: {overhead:.0f} us fixed + {rate / 1e9:.1f} GB/s")
    for spec in filter(None, args.moe_types.split(";")):
        moe_t = [resolve_type(t) for t in spec.split(",")]
        ms, bps, frac, n = moe_decode(moe_t, args.size_mb, native_bw, rng)
        names = "/".join(t.name for t in moe_t)
        print(f"fused MoE decode {names} (top-{TOP_K} of {n} experts, 7168x2048): {ms:.2f} ms/token, "
              f"{bps / 1e9:.1f} GB/s = {frac:.0%} of bw", flush=True)
    for dtype in (torch.float32, torch.bfloat16) if args.mla_layers else ():
        line = ", ".join(f"{name} {ms:.3f} ms ({bps / 1e9:.1f} GB/s = {bps / native_bw:.0%} of bw)"
                         for name, (ms, bps) in mla_absorbed(dtype, args.mla_layers, rng).items())
        print(f"MLA absorbed W_UK+W_UV per layer, {str(dtype)[6:]}, between Q4_K linears: {line}", flush=True)


if __name__ == "__main__":
    main()
