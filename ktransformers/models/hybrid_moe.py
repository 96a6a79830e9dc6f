"""Overlapped MoE: the CPU computes the routed experts while the shared experts run elsewhere.

The native `moe_forward` releases the GIL, so the routed experts are handed to one worker thread
right after the gate; the calling thread meanwhile queues (GPU) or computes (CPU) the shared
experts, then joins. When the gate runs on the GPU, the hidden state and the routing go to the
CPU through pinned host buffers with non-blocking copies, and the routed sum comes back the same
way; a CUDA event (not a device-wide sync) tells the worker when its inputs have landed.

`enable_overlap(model)` swaps every MoE block of a loaded model for this one (same weights).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .layers import MoE, run

_worker = None


def expert_worker() -> ThreadPoolExecutor:
    """One process-wide worker: routed-expert calls are sequential anyway (one native thread pool)."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-experts")
    return _worker


class HostStaging:
    """Pinned CPU buffers for one token batch size, reused across layers and steps."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def buffer(self, key: str, shape, dtype) -> torch.Tensor:
        k = (key, tuple(shape), dtype)
        if k not in self._buffers:
            self._buffers[k] = torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        return self._buffers[k]

    def to_host(self, key: str, t: torch.Tensor, dtype) -> torch.Tensor:
        out = self.buffer(key, t.shape, dtype)
        out.copy_(t, non_blocking=True)
        return out


class OverlappedMoE(nn.Module):
    """Same math as `layers.MoE`; routed experts on a worker thread, shared experts on the caller's."""

    def __init__(self, moe: MoE, staging: HostStaging | None = None):
        super().__init__()
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.staging = staging or HostStaging()

    def submit_routed(self, x: torch.Tensor):
        """Gate x, then start the routed experts on the worker; returns the future of their float32 sum."""
        topk_ids, topk_weights = run(self.gate, x)
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

        return expert_worker().submit(routed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        future = self.submit_routed(x)
        shared = None if self.shared_experts is None else self.shared_experts(x)
        routed = future.result()
        if routed.device != x.device:
            # through a pinned buffer so the upload does not stall the host
            routed = self.staging.to_host("routed", routed, routed.dtype).to(x.device, non_blocking=True)
        out = routed.to(x.dtype) * self.routed_scaling_factor
        if shared is not None:
            out = out + shared.to(x.device, x.dtype)
        return out


def enable_overlap(model) -> int:
    """Replace each `MoE` block of a DeepseekV3ForCausalLM by an `OverlappedMoE`; returns how many."""
    staging, count = HostStaging(), 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp = OverlappedMoE(layer.mlp, staging)
            count += 1
    return count
