"""Rotary position embedding for DeepSeek MLA: plain or YaRN-scaled frequencies, interleaved pairs.

DeepSeek checkpoints (and the GGUFs converted from them, which llama.cpp rotates with its
"normal" adjacent-pair rope) lay each head's rope dims out as pairs (x0, x1), (x2, x3), ...
each rotated by one frequency. Queries and keys are rotated in that layout and stay in it;
only their dot products matter, so no de-interleaving copy is needed.
"""

import math

import torch

from .config import DeepseekConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, rs: dict) -> torch.Tensor:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, blend linearly in between."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / base ** exponents
    interpolated = extrapolated / rs["factor"]

    def correction_dim(rotations):
        # the dim index whose wavelength completes `rotations` turns over the original context
        return dim * math.log(rs["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs["beta_fast"]), correction_dim(rs["beta_slow"])
    if rs["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return interpolated * ramp + extrapolated * (1 - ramp)


def rope_tables(cfg: DeepseekConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rope_dim/2], cos/sin magnitude) for the config."""
    dim, rs = cfg.qk_rope_head_dim, cfg.rope_scaling
    if rs is None:
        return 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    magnitude = rs["attention_factor"]
    if magnitude is None:
        if rs["mscale"] and rs["mscale_all_dim"]:
            magnitude = yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        else:
            magnitude = yarn_mscale(rs["factor"])
    return yarn_inv_freq(dim, cfg.rope_theta, rs), float(magnitude)


class RopeTable:
    """Rotations e^{i * pos * inv_freq} (times the YaRN magnitude) for positions 0..max_context-1.

    One table serves every attention layer; a copy is made once per device that asks for it.
    """

    def __init__(self, cfg: DeepseekConfig, max_context: int):
        inv_freq, magnitude = rope_tables(cfg)
        angles = torch.arange(max_context, dtype=torch.float32)[:, None] * inv_freq
        self.interleaved = cfg.rope_interleave
        self._tables = {torch.device("cpu"): torch.polar(torch.full_like(angles, magnitude), angles)}
        self._pairs = None

    def table(self, device) -> torch.Tensor:
        """complex64 [max_context, rope_dim / 2] on `device`."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self._tables[torch.device("cpu")].to(device)
        return self._tables[device]

    def cpu_pairs(self) -> torch.Tensor:
        """The CPU table as float32 (cos, sin) pairs [max_context, rope_dim / 2, 2] (native kernels' form)."""
        if self._pairs is None:
            self._pairs = torch.view_as_real(self._tables[torch.device("cpu")]).contiguous()
        return self._pairs

    def rotations(self, start: int, end: int, device) -> torch.Tensor:
        """complex64 [end - start, rope_dim / 2]."""
        return self.table(device)[start:end]

    def apply(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, ..., rope_dim] (any head dims in between); computed in float32, returned in x.dtype."""
        rot = rotations.view((rotations.shape[0],) + (1,) * (x.dim() - 2) + (rotations.shape[1],))
        xf = x.float()
        if self.interleaved:  # pairs (x0, x1), (x2, x3), ... are complex numbers
            pairs = torch.view_as_complex(xf.reshape(*x.shape[:-1], -1, 2))
            out = torch.view_as_real(pairs * rot).flatten(-2)
        else:  # rotate-half layout: the first half pairs with the second half
            first, second = xf.chunk(2, dim=-1)
            turned = torch.complex(first, second) * rot
            out = torch.cat((turned.real, turned.imag), dim=-1)
        return out.to(x.dtype)
