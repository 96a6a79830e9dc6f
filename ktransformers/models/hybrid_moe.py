"""Overlapped MoE: the CPU computes the routed experts while the shared experts run elsewhere.

The native `moe_forward` releases the GIL, so the routed experts are handed to one worker thread
right after the gate; the calling thread meanwhile queues (GPU) or computes (CPU) the shared
experts, then joins. When the gate runs on the GPU, the hidden state and the routing go to the
CPU through pinned host buffers with non-blocking copies, and the routed sum comes back the same
way; a CUDA event (not a device-wide sync) tells the worker when its inputs have landed.

Long prefill chunks (>= `prefill_min_tokens`) take another road when a GPU is there: the CPU
kernels are compute bound then, so the routed experts run on the GPU from streamed blocks
(operators/gpu_prefill_experts.py).

`enable_overlap(model)` swaps every MoE block of a loaded model for this one (same weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .layers import MoE, run

_worker = None
# prefill chunks of at least this many tokens run their routed experts on the GPU (when there is one):
# measured on 16 Sapphire Rapids cores + H100, the CPU wins below a few hundred tokens
PREFILL_MIN_TOKENS = 512
# Prefill chunks when routed experts stream: each chunk uploads and decodes every expert of every MoE
# layer again, whatever its length (H200 host: ~0.5 s a Q4_K_M layer per chunk, so a 4096-token prompt
# in 512-token chunks cost ~4.1 s a layer), so long prompts go in long chunks where the GPU has the
# memory for their activations (~1.5 GB at 4096 tokens of DeepSeek-V3's widths, 8 GiB asked free).
STREAMED_PREFILL_CHUNK = 4096
STREAMED_PREFILL_FREE_BYTES = 8 << 30


def streamed_prefill_chunk(free_bytes: int, default: int) -> int:
    """The prefill chunk for a model whose long chunks stream their routed experts to a GPU with
    `free_bytes` of memory free after loading."""
    return max(default, STREAMED_PREFILL_CHUNK) if free_bytes >= STREAMED_PREFILL_FREE_BYTES else default


def expert_worker() -> ThreadPoolExecutor:
    """One process-wide worker: routed-expert calls are sequential anyway (one native thread pool)."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-experts")
    return _worker


class HostStaging:
    """Pinned CPU buffers, one per role, grown to the largest batch seen and reused across layers and steps."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, key: str, shape, dtype) -> torch.Tensor:
        n = math.prod(shape)
        flat = self._buffers.get((key, dtype))
        if flat is None or flat.numel() < n:
            with torch.inference_mode(False):  # plain tensors: usable inside and outside inference mode
                flat = torch.empty(n, dtype=dtype, pin_memory=torch.cuda.is_available())
            self._buffers[(key, dtype)] = flat
        return flat[:n].view(shape)

    def to_host(self, key: str, t: torch.Tensor, dtype) -> torch.Tensor:
        out = self.buffer(key, t.shape, dtype)
        out.copy_(t, non_blocking=True)
        return out


class OverlappedMoE(MoE):
    """`layers.MoE` with another hand-off: routed experts on a worker thread (or, for long prefill
    chunks, on the GPU from streamed blocks); the shared experts stay on the caller's thread."""

    def __init__(self, moe: MoE, staging: HostStaging | None = None, prefill_experts=None,
                 prefill_min_tokens: int = PREFILL_MIN_TOKENS):
        nn.Module.__init__(self)  # takes over moe's modules instead of building them
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.routed_scaling_factor = moe.routed_scaling_factor
        self._fused_shared = None  # the shared experts keep the caller's thread (its GPU, in hybrid runs)
        self.staging = staging or HostStaging()
        self.prefill_experts, self.prefill_min_tokens = prefill_experts, prefill_min_tokens

    def start_routed(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        topk_ids, topk_weights = run(self.gate, x)
        if self.prefill_experts is not None and x.shape[0] >= self.prefill_min_tokens:
            routed = self.prefill_experts(x, topk_ids, topk_weights)
            return lambda: routed
        future = expert_worker().submit(self._routed_call(x, topk_ids, topk_weights))

        def result():
            routed = future.result()
            if routed.device != x.device:  # through a pinned buffer so the upload does not stall the host
                routed = self.staging.to_host("routed", routed, routed.dtype).to(x.device, non_blocking=True)
            return routed
        return result

    def _routed_call(self, x, topk_ids, topk_weights):
        """The routed experts as a call for the worker thread, with their inputs on the experts' device."""
        p = self.experts.placement
        if p.device.type == "cpu" and x.device.type == "cuda":
            # pinned + non_blocking: the copies queue behind the gate; the worker waits on the event only
            inputs = (self.staging.to_host("x", x, torch.float32), self.staging.to_host("ids", topk_ids, torch.int64),
                      self.staging.to_host("w", topk_weights, torch.float32))
            ready = torch.cuda.Event()
            ready.record()
        else:
            inputs = (x.to(p.device, p.dtype), topk_ids.to(p.device), topk_weights.to(p.device))
            ready = None

        def routed():
            if ready is not None:
                ready.synchronize()
            with torch.inference_mode():
                return self.experts(*inputs)
        return routed


def streams_prefill_experts(model) -> bool:
    """Whether long prefill chunks of this model run their routed experts from streamed blocks."""
    return any(getattr(layer.mlp, "prefill_experts", None) is not None for layer in model.model.layers)


def enable_overlap(model, prefill_min_tokens: int | None = PREFILL_MIN_TOKENS) -> int:
    """Replace each MoE block of a DeepseekV3ForCausalLM by an `OverlappedMoE`; returns how many.

    prefill_min_tokens: with CPU routed experts and a cuda router, chunks this long run their routed
    experts on the GPU (None: never).
    """
    from ktransformers.operators.cpu_quant import CpuQuantExperts
    from ktransformers.operators.gpu_prefill_experts import StreamedExperts

    staging, count = HostStaging(), 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):  # an OverlappedMoE is set up afresh
            moe, streamed = layer.mlp, None
            gate_device = moe.gate.placement.device
            if prefill_min_tokens is not None and gate_device.type == "cuda" and isinstance(moe.experts,
                                                                                           CpuQuantExperts):
                streamed = StreamedExperts(moe.experts, gate_device)
            layer.mlp = OverlappedMoE(moe, staging, streamed, prefill_min_tokens or 0)
            count += 1
    return count
