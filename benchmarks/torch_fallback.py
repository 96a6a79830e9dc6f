"""How much slower the torch fallback (CPUs without AVX2/FMA) decodes than the native kernels.

    python benchmarks/torch_fallback.py [--experts 16] [--repeats 5]

Both run on this machine, one token at a time, with DeepSeek-V3's widths (hidden 7168, expert
intermediate 2048, top-8) and Q4_K_M blocks (Q4_K gate/up, Q6_K down):
* routed experts: kernels.moe_forward vs DequantOnUseExperts (decodes each picked expert, then
  torch matmuls in float32: the fallback's memory stays at the GGUF's size);
* a 7168x7168 Q4_K linear (attention and dense projections): kernels.quant_linear vs TorchLinear
  (dequantized once to float32, so it streams 7x the bytes).
Prints ms per token, GB/s of GGUF bytes next to the measured memory bandwidth, and the slowdown
that operators/registry.py quotes in its fallback message. A CPU without AVX2 runs torch's own
kernels without AVX too, so there the fallback is slower still.
"""

import argparse
import time

import ktransformers  # noqa: F401  before torch: torch's OpenMP threads sleep between ops
import numpy as np
import torch

from ktransformers import kernels
from ktransformers.gguf import GGMLType, QuantTensor, random_quant_bytes
from ktransformers.operators.experts import DequantOnUseExperts
from ktransformers.operators.linear import TorchLinear

from cpu_kernels import best_time, measure_bandwidth  # this folder: the same timing and bandwidth probe

HIDDEN, MOE_INTERMEDIATE, TOP_K = 7168, 2048, 8


def quant(name, ggml_type, shape, rng):
    return QuantTensor(name, GGMLType[ggml_type], shape, random_quant_bytes(GGMLType[ggml_type], shape, rng, scale=0.02))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16, help="experts in the stack (top-8 of them per token)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    bw = measure_bandwidth(512)[0] / 1e9
    print(f"kernel table {kernels.cpu_features()['isa']}, {kernels.num_threads()} threads, "
          f"torch {torch.get_num_threads()} threads; measured read bandwidth {bw:.1f} GB/s")

    E, H, I = args.experts, HIDDEN, MOE_INTERMEDIATE
    gate, up = (quant(f"ffn_{p}_exps", "Q4_K", (E, I, H), rng) for p in ("gate", "up"))
    down = quant("ffn_down_exps", "Q6_K", (E, H, I), rng)
    x = torch.randn(1, H)
    ids = torch.from_numpy(rng.choice(E, TOP_K, replace=False)).long()[None]
    w = torch.full((1, TOP_K), 1 / TOP_K)
    fallback = DequantOnUseExperts(gate, up, down, "cpu", torch.float32)
    per_token = TOP_K * (gate.nbytes + up.nbytes + down.nbytes) // E

    def native_moe():
        kernels.moe_forward(x, ids, w, gate.raw(), gate.ggml_type, up.raw(), up.ggml_type, down.raw(),
                            down.ggml_type, E, H, I)

    linear_w = quant("attn_output", "Q4_K", (H, H), rng)
    torch_linear = TorchLinear(linear_w, None, "cpu", torch.float32)
    rows = [("routed experts (Q4_K_M, top-8)", per_token, native_moe, lambda: fallback(x, ids, w)),
            ("7168x7168 Q4_K linear", linear_w.nbytes,
             lambda: kernels.quant_linear(x, linear_w.raw(), linear_w.ggml_type, H, H), lambda: torch_linear(x))]
    print(f"{'part':32} {'native ms':>10} {'GB/s':>6} {'fallback ms':>12} {'GB/s':>6} {'slowdown':>9}")
    for label, nbytes, native, torch_path in rows:
        native(), torch_path()  # warm-up
        t_native, t_torch = best_time(native, args.repeats), best_time(torch_path, args.repeats)
        print(f"{label:32} {t_native * 1e3:10.2f} {nbytes / t_native / 1e9:6.1f} {t_torch * 1e3:12.2f} "
              f"{nbytes / t_torch / 1e9:6.1f} {t_torch / t_native:8.1f}x")


if __name__ == "__main__":
    main()
