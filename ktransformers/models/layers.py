"""Small building blocks of the DeepSeek model: placement-aware calls, RMSNorm, embedding, dense MLP."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ktransformers import kernels
from ktransformers.operators.cpu_quant import LinearGroup


def run(module: nn.Module, *tensors: torch.Tensor):
    """Call `module` with its inputs moved to the device/dtype its placement rule gave it.

    The loader stamps every leaf module with `placement` (device, dtype); moving activations here,
    at module boundaries, is what lets attention sit on cuda while experts run on the CPU.
    """
    p = module.placement
    return module(*(t.to(p.device, p.dtype) for t in tensors))


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, device, dtype):
        super().__init__()
        self.register_buffer("weight", weight.to(device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and kernels.available():
            return kernels.rms_norm(x, self.weight, self.eps)  # one call, not five torch ops (CPU decode)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class QuantEmbedding(nn.Module):
    """Token embedding that keeps the GGUF table where it lies and dequantizes only the looked-up rows."""

    def __init__(self, table, dequantize, device, dtype):
        super().__init__()
        self.table, self._dequantize = table, dequantize
        self.num_embeddings, self.embedding_dim = table.shape
        self.device, self.dtype = torch.device(device), dtype
        self._rows = table.raw().view(self.num_embeddings, -1)  # zero-copy: one row of blocks per token
        # the native row decoder where it knows the type: one call instead of ~25 torch ops a lookup
        self._type = int(table.ggml_type)
        self._native = kernels.require() if self._type in kernels.row_decoder_types() else None
        self._rows_np = self._rows.numpy()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"token id out of range 0..{self.num_embeddings - 1}: {ids.tolist()}")
        if self._native is not None:
            flat = ids.reshape(-1).to("cpu", torch.int64).contiguous()
            rows = torch.empty(flat.numel(), self.embedding_dim)
            self._native.dequantize_rows(self._rows_np, self._type, self.num_embeddings, self.embedding_dim,
                                         self._rows.shape[1], flat.numpy(), rows.numpy())
            return rows.view(*ids.shape, self.embedding_dim).to(self.device, self.dtype)
        # index_select, not rows[ids]: advanced indexing of the 129280-row table entered a parallel
        # region (~60 us a lookup on a 2-core VM); index_select just copies the rows (~2 us)
        raw = self._rows.index_select(0, ids.reshape(-1).cpu())
        rows = self._dequantize(raw, self.table.ggml_type, (ids.numel(), self.embedding_dim))
        return rows.view(*ids.shape, self.embedding_dim).to(self.device, self.dtype)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.ggml_type.name} rows"


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts (gate_proj, up_proj, down_proj)."""

    def __init__(self, factory, prefix: str):
        super().__init__()
        self.gate_proj = factory.linear(f"{prefix}.gate_proj")
        self.up_proj = factory.linear(f"{prefix}.up_proj")
        self.down_proj = factory.linear(f"{prefix}.down_proj")
        self._gate_and_up = LinearGroup.of(self.gate_proj, self.up_proj)  # decode: one native call for both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_and_up is not None and x.shape[0] == 1:
            gate, up = self._gate_and_up(x)
            return run(self.down_proj, F.silu(gate) * up)
        gate = run(self.gate_proj, x)
        up = run(self.up_proj, x).to(gate.device)
        return run(self.down_proj, F.silu(gate) * up)


# Tokens up to which the shared expert runs inside the routed experts' call; a longer prefill chunk
# takes the separate linears, whose token tiles keep activations in cache (the fused pass would
# stream every token's activations once per weight row).
FUSED_SHARED_MAX_TOKENS = 16


class MoE(nn.Module):
    """Routed experts (weighted by the gate, times routed_scaling_factor) plus the shared experts.

    The routed experts are started first (`start_routed`), the shared experts computed meanwhile: with
    experts on the CPU and shared experts on the GPU, the GPU kernels are only queued, so both sides
    work at once. Here the routed experts run in the caller's thread; hybrid_moe.OverlappedMoE
    overrides only `start_routed` to run them on a worker thread.
    """

    def __init__(self, cfg, factory, prefix: str):
        super().__init__()
        self.gate = factory.gate(f"{prefix}.gate")
        self.experts = factory.experts(f"{prefix}.experts")
        self.shared_experts = MLP(factory, f"{prefix}.shared_experts") if cfg.n_shared_experts else None
        self.routed_scaling_factor = cfg.routed_scaling_factor
        # CPU rules: the shared expert joins the routed experts' native call (one pass over the
        # kernel pool instead of four) for decode-sized inputs
        shared_form = getattr(self.experts, "shared_form", None)
        self._fused_shared = shared_form(self.shared_experts) if shared_form and self.shared_experts else None

    def start_routed(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Gate x and hand the routed experts their inputs; returns the call that yields their sum."""
        topk_ids, topk_weights = run(self.gate, x)
        p = self.experts.placement
        inputs = x.to(p.device, p.dtype), topk_ids.to(p.device), topk_weights.to(p.device)
        return lambda: self.experts(*inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_shared is not None and x.shape[0] <= FUSED_SHARED_MAX_TOKENS:
            topk_ids, topk_weights = run(self.gate, x)
            return self.experts(x, topk_ids, topk_weights, self.routed_scaling_factor, self._fused_shared)
        routed = self.start_routed(x)
        shared = None if self.shared_experts is None else self.shared_experts(x)
        out = routed().to(x.device, x.dtype) * self.routed_scaling_factor
        if shared is not None:
            out = out + shared.to(x.device, x.dtype)
        return out
