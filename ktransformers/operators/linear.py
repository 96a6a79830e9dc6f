"""TorchLinear: the reference linear backend (dequantize the GGUF weight once, then torch matmul)."""

import torch
import torch.nn.functional as F
from torch import nn


class TorchLinear(nn.Module):
    """`weight` is a QuantTensor of shape (out_features, in_features); computes in `dtype` on `device`."""

    def __init__(self, weight, bias: torch.Tensor | None, device, dtype):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"{weight.name}: a linear weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.dequantize(torch.float32).to(device=device, dtype=dtype))
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x.to(w.device, w.dtype), w, self.bias).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"
