#!/usr/bin/env python3
"""MLA attention decode speed (one token against a filled compressed KV cache) vs memory bandwidth.

    python benchmarks/mla_decode.py                          # DeepSeek-V3 sizes, cuda if present
    python benchmarks/mla_decode.py --device cpu --small     # small sizes for a CPU box
    python benchmarks/mla_decode.py --context 8192 --dtype bfloat16

Decoding one token reads every attention weight once plus the whole compressed cache, so it is
memory bound: the script prints the bytes one step must read, the achieved GB/s, and the device's
measured copy bandwidth (read + write of a large buffer) next to it. "graph" replays
MLAttention.decode_static as a captured CUDA graph, as util/cuda_graph.StaticDecoder does (cuda
only; it scores every row of the cache window, max(--context) + 1, so its bytes count them all). "core" times
only the attention over the cache (scores, softmax, weighted latent sum), the part that grows
with context.
"""

import argparse
import time
from types import SimpleNamespace

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import numpy as np
import torch

from ktransformers.gguf import GGMLType, QuantTensor
from ktransformers.models.absorbed_kv_b import AbsorbedKVB
from ktransformers.models.config import DeepseekConfig
from ktransformers.models.layers import RMSNorm
from ktransformers.models.mla import MLAttention
from ktransformers.models.rope import RopeTable
from ktransformers.operators.linear import TorchLinear
from ktransformers.util.cuda_graph import capture_graph

V3 = dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
SMALL = dict(hidden_size=1024, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


class RandomWeights:
    """Stands in for the GGUF module factory: random weights, every module on one device/dtype."""

    def __init__(self, cfg, device, dtype, seed=0):
        self.cfg, self.rng = cfg, np.random.default_rng(seed)
        self.place = SimpleNamespace(device=torch.device(device), dtype=dtype)
        self.weight_bytes = 0
        h, heads, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        self.shapes = {"q_a_proj": (cfg.q_lora_rank, h), "q_b_proj": (heads * cfg.qk_head_dim, cfg.q_lora_rank),
                       "kv_a_proj_with_mqa": (c + cfg.qk_rope_head_dim, h), "o_proj": (h, heads * cfg.v_head_dim)}

    def _random(self, shape):
        values = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        self.weight_bytes += values.size * torch.tensor([], dtype=self.place.dtype).element_size()
        return values

    def placement(self, name):
        return self.place

    def _stamp(self, module):
        module.placement = self.place
        return module

    def linear(self, name):
        shape = self.shapes[name.rsplit(".", 1)[1]]
        raw = self._random(shape).reshape(-1).view(np.uint8)
        return self._stamp(TorchLinear(QuantTensor(name, GGMLType.F32, shape, raw), None,
                                       self.place.device, self.place.dtype))

    def norm(self, name):
        size = self.cfg.q_lora_rank if "q_a" in name else self.cfg.kv_lora_rank
        return self._stamp(RMSNorm(torch.ones(size), 1e-6, self.place.device, self.place.dtype))

    def kv_b(self, name):
        cfg = self.cfg
        heads, c = cfg.num_attention_heads, cfg.kv_lora_rank
        w_uk = torch.from_numpy(self._random((heads, cfg.qk_nope_head_dim, c)))
        w_uv = torch.from_numpy(self._random((heads, cfg.v_head_dim, c)))
        return self._stamp(AbsorbedKVB(w_uk, w_uv, self.place.device, self.place.dtype))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def captured_step(attn, x, position: int):
    """The replay of attn.decode_static(x, position) captured as a CUDA graph."""
    position = torch.tensor([position], device=x.device)
    graph, _ = capture_graph(lambda: attn.decode_static(x, position))
    return graph.replay


def copy_bandwidth(device):
    nbytes = 1 << (30 if device.type == "cuda" else 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 5)
    return 2 * nbytes / seconds / 1e9  # bytes read + bytes written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--small", action="store_true", help="small model sizes instead of DeepSeek-V3's")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = SMALL if args.small else V3
    cfg = DeepseekConfig(architecture="deepseek_v3", vocab_size=1, intermediate_size=1, moe_intermediate_size=1,
                         num_hidden_layers=1, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=0,
                         first_k_dense_replace=1, rope_scaling={"type": "yarn", "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": None, "truncate": True},
                         **sizes)
    weights = RandomWeights(cfg, device, dtype)
    max_context = max(args.context) + 1
    attn = MLAttention(cfg, weights, "model.layers.0.self_attn", max_context, RopeTable(cfg, max_context))
    element = torch.tensor([], dtype=dtype).element_size()
    attn.kv_cache.normal_()
    bandwidth = copy_bandwidth(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"threads {torch.get_num_threads()}; measured copy bandwidth {bandwidth:.1f} GB/s")
    print(f"sizes {sizes}; attention weights {weights.weight_bytes / 1e6:.1f} MB per layer")
    print(f"{'context':>8} {'step ms':>9} {'step GB/s':>10} {'% bw':>6} {'graph ms':>9} {'graph GB/s':>10} {'% bw':>6} "
          f"{'core ms':>9} {'core GB/s':>10} {'% bw':>6}")
    x = torch.randn(1, cfg.hidden_size, device=device, dtype=dtype)
    for context in args.context:
        step = timed(lambda: attn(x, context), device, args.repeats)
        graph_step = (timed(captured_step(attn, x, context), device, args.repeats) if device.type == "cuda"
                      else float("nan"))
        row_bytes = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element
        cache_bytes = (context + 1) * row_bytes
        step_rate = (weights.weight_bytes + cache_bytes) / step / 1e9
        graph_rate = (weights.weight_bytes + max_context * row_bytes) / graph_step / 1e9

        query = torch.randn(cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device,
                            dtype=dtype)
        keys = attn.kv_cache[:context + 1]
        core = timed(lambda: attn._attend(query, keys, keys[:, :cfg.kv_lora_rank], context, 1), device, args.repeats)
        core_rate = cache_bytes / core / 1e9
        print(f"{context:>8} {step * 1e3:>9.3f} {step_rate:>10.1f} {100 * step_rate / bandwidth:>5.0f}% "
              f"{graph_step * 1e3:>9.3f} {graph_rate:>10.1f} {100 * graph_rate / bandwidth:>5.0f}% "
              f"{core * 1e3:>9.3f} {core_rate:>10.1f} {100 * core_rate / bandwidth:>5.0f}%")


if __name__ == "__main__":
    main()
