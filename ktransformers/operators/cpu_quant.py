"""The "cpu_quant" backends: linears and routed experts computed by the native CPU kernels
straight from the raw GGUF blocks (no dequantized copy is ever made).

Inputs may live on any device in any dtype; the kernels run in float32 on the CPU and results
return in the input's device and dtype. Construction raises RuntimeError naming the reason when
the kernels cannot run here (extension not built, CPU without AVX2), so callers can fall back to
the "torch" backend; `available()` asks the same question without raising.
"""

import os
import warnings

import torch
from torch import nn

from ktransformers import kernels


def available() -> bool:
    return kernels.available()


def _raw_view(t) -> torch.Tensor:
    """The tensor's blocks as a uint8 torch view of its memory map (zero-copy)."""
    if t.ggml_type not in kernels.supported_types():
        raise ValueError(f"{t.name}: no native kernel for {t.ggml_type.name}; "
                         f"cpu_quant supports {[x.name for x in kernels.supported_types()]}")
    return torch.from_numpy(t.data)


def _as_cpu_float(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous CPU float32 tensor (itself when it is one already)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        return x.detach()
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _require(name):
    try:
        kernels.require()
    except RuntimeError as error:
        raise RuntimeError(f"{name}: {error}; use the 'torch' backend for it instead") from None
    _warn_if_openmp_spins()


_warned_openmp = False


def openmp_spins() -> bool:
    """Whether torch's OpenMP threads busy-wait after each parallel op (libgomp's default policy).

    They then spin on every core while the native pool runs the next kernel, starving it: CPU
    attention alternates torch ops and native linears, and a linear right after a torch bmm took
    1.2-1.6x as long on a 2-core VM (more spinning threads, and longer PAUSEs, on a big server).
    The policy is read once, when torch loads OpenMP: `import ktransformers` sets it PASSIVE when
    torch is not imported yet, so this is true only when torch came first (or the user asked to spin).
    """
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    no_spin = os.environ.get("GOMP_SPINCOUNT", "").strip() == "0"
    return torch.get_num_threads() > 1 and not (passive or no_spin)


def _warn_if_openmp_spins():
    global _warned_openmp
    if _warned_openmp or not openmp_spins():
        return
    _warned_openmp = True
    warnings.warn("torch's OpenMP threads busy-wait between ops and starve the native cpu_quant kernels "
                  "(CPU decode ran several times slower); import ktransformers before torch (it then sets "
                  "OMP_WAIT_POLICY=PASSIVE), start the process with OMP_WAIT_POLICY=PASSIVE, "
                  "or call torch.set_num_threads(1)", RuntimeWarning, stacklevel=4)


class CpuQuantLinear(nn.Module):
    """`weight`: QuantTensor (out_features, in_features). forward(x [..., in]) -> [..., out] in x's dtype/device."""

    def __init__(self, weight, bias: torch.Tensor | None, device=None, dtype=None):
        super().__init__()
        _require(weight.name)
        if len(weight.shape) != 2:
            raise ValueError(f"{weight.name}: a linear weight must be 2-D, got shape {tuple(weight.shape)}")
        self.name = weight.name
        self.ggml_type = weight.ggml_type
        self.out_features, self.in_features = weight.shape
        self.raw = _raw_view(weight)  # a plain attribute, not a buffer: .to(device) must not move it
        self._row_bytes = kernels.check_weight(weight.name, self.raw, self.ggml_type, self.out_features, self.in_features)
        self._raw_np, self._type, self._kernels = self.raw.numpy(), int(self.ggml_type), kernels.require()
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"{weight.name}: bias of shape {tuple(bias.shape)} for {self.out_features} outputs")
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        flat = _as_cpu_float(x.reshape(-1, self.in_features))
        y = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32)
        # straight to the extension (which re-checks every size): the weight was checked once, at load,
        # and a decode step makes hundreds of these calls
        self._kernels.quant_linear(flat.numpy(), flat.shape[0], self._raw_np, self._type, self.out_features,
                                       self.in_features, self._row_bytes, y.numpy())
        if self.bias is not None:
            y += self.bias
        return y.to(device=x.device, dtype=x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.ggml_type.name}"


class LinearGroup:
    """CpuQuantLinears that read the same input (MLA's q_a and kv_a, an MLP's gate and up), run on one
    decode row as one native call: the row is quantized once and one pool pass walks all their weights.
    Each output equals the linear's own, bit for bit. `of(...)` is None unless they can be grouped."""

    def __init__(self, linears):
        self._kernels = kernels.require()
        self._matrices = [(m._raw_np, m._type, m.out_features, m.in_features, m._row_bytes) for m in linears]
        self._widths = [m.out_features for m in linears]

    @classmethod
    def of(cls, *modules) -> "LinearGroup | None":
        groupable = all(isinstance(m, CpuQuantLinear) and m.bias is None for m in modules) and \
            len({m.in_features for m in modules}) == 1
        return cls(modules) if groupable else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [1, in_features] -> each linear's float32 CPU output [1, out_features]."""
        x = _as_cpu_float(x)
        outs = [torch.empty(1, width) for width in self._widths]
        self._kernels.linear_group(x.numpy(), 1, self._matrices, [out.numpy() for out in outs])
        return outs


class CpuQuantExperts(nn.Module):
    """Expert stacks gate/up (E, I, H) and down (E, H, I) as QuantTensors.

    forward(x [T, H], topk_ids int64 [T, k], topk_weights [T, k]) = sum_j w_j * down_e(silu(gate_e x) * up_e x),
    not multiplied by routed_scaling_factor.
    """

    def __init__(self, gate, up, down, device=None, dtype=None):
        super().__init__()
        _require(gate.name)
        for t in (gate, up, down):
            if len(t.shape) != 3:
                raise ValueError(f"{t.name}: an expert stack must be 3-D (experts, out, in), got {tuple(t.shape)}")
        self.n_experts, self.intermediate, self.hidden = gate.shape
        if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (self.n_experts, self.hidden, self.intermediate):
            raise ValueError(f"{gate.name}/{up.name}/{down.name}: shapes {tuple(gate.shape)}, {tuple(up.shape)}, "
                             f"{tuple(down.shape)} do not form gate/up (E, I, H) + down (E, H, I)")
        self.types = (gate.ggml_type, up.ggml_type, down.ggml_type)
        self.gate_raw, self.up_raw, self.down_raw = (_raw_view(t) for t in (gate, up, down))
        self._kernels = kernels.require()
        rows_cols = ((self.intermediate, self.hidden),) * 2 + ((self.hidden, self.intermediate),)
        # (numpy view, type id, row bytes) per stack, checked once here; the extension re-checks sizes
        self._stacks = [(raw.numpy(), int(t.ggml_type),
                         kernels.check_weight(t.name, raw, t.ggml_type, self.n_experts * rows, cols))
                        for raw, t, (rows, cols) in zip((self.gate_raw, self.up_raw, self.down_raw), (gate, up, down),
                                                        rows_cols)]

    def shared_form(self, mlp) -> tuple | None:
        """A shared expert `mlp` (gate_proj/up_proj/down_proj) in the form `forward(shared=)` takes, or None
        when it cannot join the native call (not bias-free CpuQuantLinears of this layer's width)."""
        linears = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(isinstance(m, CpuQuantLinear) and m.bias is None for m in linears):
            return None
        width = mlp.gate_proj.out_features
        shapes = [(m.out_features, m.in_features) for m in linears]
        if shapes != [(width, self.hidden), (width, self.hidden), (self.hidden, width)]:
            return None
        return tuple(v for m in linears for v in (m._raw_np, m._type, m._row_bytes)) + (width,)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                routed_scale: float = 1.0, shared: tuple | None = None) -> torch.Tensor:
        """routed_scale multiplies the routed sum; `shared` (from shared_form) adds that expert's output."""
        if x.dim() != 2 or x.shape[1] != self.hidden or topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape \
                or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"experts: x must be [T, {self.hidden}] with topk_ids and topk_weights [T, k]; got "
                             f"{tuple(x.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
        xs, weights = _as_cpu_float(x), _as_cpu_float(topk_weights)
        ids = topk_ids.to(device="cpu", dtype=torch.int64).contiguous()
        y = torch.empty(xs.shape, dtype=torch.float32)
        (g, gt, gb), (u, ut, ub), (d, dt, db) = self._stacks
        self._kernels.moe_forward(xs.numpy(), xs.shape[0], self.hidden, ids.numpy(), weights.numpy(), ids.shape[1],
                                      g, gt, gb, u, ut, ub, d, dt, db, self.n_experts, self.intermediate, y.numpy(),
                                      float(routed_scale), shared)
        return y.to(device=x.device, dtype=x.dtype)

    def extra_repr(self):
        return (f"experts={self.n_experts}, hidden={self.hidden}, intermediate={self.intermediate}, "
                f"types={'/'.join(t.name for t in self.types)}")
