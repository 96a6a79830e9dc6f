"""The torch routed-experts backends: TorchExperts (the reference: dequantized expert stacks,
torch matmuls) and DequantOnUseExperts (the fallback when the native kernels cannot run)."""

import torch
import torch.nn.functional as F
from torch import nn


def _check_stacks(gate, up, down) -> int:
    """The expert count of gate/up (E, I, H) + down (E, H, I) QuantTensor stacks; ValueError otherwise."""
    for t in (gate, up, down):
        if len(t.shape) != 3:
            raise ValueError(f"{t.name}: an expert stack must be 3-D (experts, out, in), got {tuple(t.shape)}")
    n_experts, intermediate, hidden = gate.shape
    if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (n_experts, hidden, intermediate):
        raise ValueError(f"{gate.name}/{up.name}/{down.name}: shapes {tuple(gate.shape)}, {tuple(up.shape)}, "
                         f"{tuple(down.shape)} do not form gate/up (E, I, H) + down (E, H, I)")
    return n_experts


class TorchExperts(nn.Module):
    """Expert stacks `gate`/`up` (E, I, H) and `down` (E, H, I) as QuantTensors, dequantized once.

    forward(x [T, H], topk_ids [T, k], topk_weights [T, k]) = sum_j w_j * down_e(silu(gate_e x) * up_e x),
    not multiplied by routed_scaling_factor (the MoE block does that).
    """

    def __init__(self, gate, up, down, device, dtype):
        super().__init__()
        self.n_experts = _check_stacks(gate, up, down)

        def load(t):
            return t.dequantize(torch.float32).to(device=device, dtype=dtype)

        self.register_buffer("gate", load(gate))
        self.register_buffer("up", load(up))
        self.register_buffer("down", load(down))

    def compute_on(self) -> tuple[torch.device, torch.dtype]:
        """Where and in what dtype the experts compute (the buffers', so module.to() moves it)."""
        return self.gate.device, self.gate.dtype

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [I, H], up [I, H], down [H, I] of one expert, on the compute device in its dtype."""
        return self.gate[expert], self.up[expert], self.down[expert]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        dev, dt = self.compute_on()
        xs = x.to(dev, dt)
        topk_ids = topk_ids.to(dev)
        weights = topk_weights.to(dev, torch.float32)
        out = torch.zeros(xs.shape, device=dev, dtype=torch.float32)
        # visit only the experts some token picked: each gets the rows that chose it
        for expert in torch.unique(topk_ids).tolist():
            if not 0 <= expert < self.n_experts:
                raise ValueError(f"expert id {expert} out of range 0..{self.n_experts - 1}")
            tokens, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            gate, up, down = self.expert_weights(expert)
            h = xs[tokens]
            act = F.silu(h @ gate.T) * (h @ up.T)
            y = (act @ down.T).float() * weights[tokens, slot, None]
            out.index_add_(0, tokens, y)
        return out.to(x.dtype)


class DequantOnUseExperts(TorchExperts):
    """TorchExperts that keeps the GGUF blocks and dequantizes an expert only when a token picks it.

    The fallback for CPUs the native kernels cannot run on (no AVX2/FMA): memory stays at the
    GGUF's size instead of growing to float copies of every expert (8x a Q4_K file in float32),
    at the price of decoding each picked expert on every step.
    """

    def __init__(self, gate, up, down, device, dtype):
        nn.Module.__init__(self)
        self.n_experts = _check_stacks(gate, up, down)
        self.stacks = (gate, up, down)
        self.device, self.dtype = torch.device(device), dtype

    def compute_on(self) -> tuple[torch.device, torch.dtype]:
        return self.device, self.dtype

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.select(expert).dequantize(torch.float32).to(self.device, self.dtype) for t in self.stacks)
