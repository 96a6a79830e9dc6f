"""TorchExperts: the reference routed-experts backend (dequantized expert stacks, torch matmuls)."""

import torch
import torch.nn.functional as F
from torch import nn


class TorchExperts(nn.Module):
    """Expert stacks `gate`/`up` (E, I, H) and `down` (E, H, I) as QuantTensors.

    forward(x [T, H], topk_ids [T, k], topk_weights [T, k]) = sum_j w_j * down_e(silu(gate_e x) * up_e x),
    not multiplied by routed_scaling_factor (the MoE block does that).
    """

    def __init__(self, gate, up, down, device, dtype):
        super().__init__()
        for t in (gate, up, down):
            if len(t.shape) != 3:
                raise ValueError(f"{t.name}: an expert stack must be 3-D (experts, out, in), got {tuple(t.shape)}")
        n_experts, intermediate, hidden = gate.shape
        if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (n_experts, hidden, intermediate):
            raise ValueError(f"{gate.name}/{up.name}/{down.name}: shapes {tuple(gate.shape)}, {tuple(up.shape)}, "
                             f"{tuple(down.shape)} do not form gate/up (E, I, H) + down (E, H, I)")
        self.n_experts = n_experts

        def load(t):
            return t.dequantize(torch.float32).to(device=device, dtype=dtype)

        self.register_buffer("gate", load(gate))
        self.register_buffer("up", load(up))
        self.register_buffer("down", load(down))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        dev, dt = self.gate.device, self.gate.dtype
        xs = x.to(dev, dt)
        topk_ids = topk_ids.to(dev)
        weights = topk_weights.to(dev, torch.float32)
        out = torch.zeros(xs.shape, device=dev, dtype=torch.float32)
        # visit only the experts some token picked: each gets the rows that chose it
        for expert in torch.unique(topk_ids).tolist():
            if not 0 <= expert < self.n_experts:
                raise ValueError(f"expert id {expert} out of range 0..{self.n_experts - 1}")
            tokens, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            h = xs[tokens]
            act = F.silu(h @ self.gate[expert].T) * (h @ self.up[expert].T)
            y = (act @ self.down[expert].T).float() * weights[tokens, slot, None]
            out.index_add_(0, tokens, y)
        return out.to(x.dtype)
