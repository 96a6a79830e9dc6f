"""Native CPU kernels for GGUF-quantized weights (the `cpu_quant` backend's engine).

The C++ extension `_cpu` (built by setup.py from csrc/) holds one dot kernel per ggml type and
ISA, a persistent thread pool, a tiled quantized linear (and its per-head form, head_linear), a
fused routed-experts forward and the one-token MLA attention of CPU decode (mla_decode_attention).
Everything here takes CPU float32 torch tensors and raw uint8 weight tensors (zero-copy views of
the GGUF memory map) and returns float32 CPU tensors.

Thread count: `set_num_threads(n)`, else the env var KT_CPU_INFER, else the physical core count.
"""

from __future__ import annotations

import os

import torch

from ktransformers.gguf.ggml_types import GGMLType, resolve_type, row_nbytes

try:
    from ktransformers.kernels import _cpu
except ImportError as error:  # not built: callers get a clear message from require()
    _cpu = None
    _import_error = f"the native extension ktransformers.kernels._cpu is not built ({error}); run `python setup.py build_ext --inplace`"
else:
    _import_error = None


# Kernel tables, best first; "vnni" names whichever avx512vnni table is the default here.
KNOWN_ISAS = ("avx512vnni+gather", "avx512vnni", "vnni", "avx2")


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None when they can."""
    if _cpu is None:
        return _import_error
    if not _cpu.isa():
        return "this CPU lacks AVX2/FMA, which the native cpu_quant kernels need"
    return None


def isa_override_error() -> str | None:
    """What is wrong with $KT_CPU_ISA (a table this CPU cannot run, an unknown name), or None.

    The C++ side would quietly keep its default table; a forced table is a promise about what
    runs, so callers turn this into an error instead.
    """
    forced = os.environ.get("KT_CPU_ISA", "").strip()
    if not forced or _cpu is None:
        return None
    if forced not in KNOWN_ISAS:
        return f"KT_CPU_ISA={forced}: unknown kernel table; known: {', '.join(KNOWN_ISAS)}"
    runnable = list(_cpu.available_isas())
    if forced in runnable or (forced == "vnni" and any(n.startswith("avx512vnni") for n in runnable)):
        return None
    runs = f"it runs {', '.join(runnable)}" if runnable else "it lacks AVX2/FMA, so it runs no native table"
    return f"KT_CPU_ISA={forced}: this CPU cannot run that kernel table ({runs}); unset KT_CPU_ISA or pick one of those"


def check_isa_override() -> None:
    """Raise ValueError when $KT_CPU_ISA names a table this CPU cannot run."""
    error = isa_override_error()
    if error:
        raise ValueError(error)


def available() -> bool:
    return unavailable_reason() is None


def require():
    """The extension module, or RuntimeError saying why it cannot be used."""
    reason = isa_override_error() or unavailable_reason()
    if reason:
        raise RuntimeError(f"cpu_quant kernels unavailable: {reason}")
    return _cpu


def default_threads() -> int:
    """The pool size without set_num_threads: KT_CPU_INFER, else the physical core count."""
    return _default_threads()


def _default_threads() -> int:
    env = os.environ.get("KT_CPU_INFER")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"KT_CPU_INFER must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"KT_CPU_INFER must be a positive integer, got {env!r}")
        return n
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Resize the kernel thread pool (do not call while kernels run on other threads)."""
    require().set_num_threads(int(n))


def num_threads() -> int:
    return require().num_threads()


def cpu_features() -> dict:
    """What the kernels will use on this machine."""
    if _cpu is None:
        return {"available": False, "reason": _import_error}
    return {
        "available": available(),
        "reason": unavailable_reason(),
        "isa": _cpu.isa(),
        "available_isas": list(_cpu.available_isas()),
        "threads": _cpu.num_threads() if _cpu.isa() else 0,
    }


_supported: tuple[GGMLType, ...] | None = None


def supported_types() -> list[GGMLType]:
    """ggml types with a native kernel (the same for every ISA; empty when unavailable)."""
    global _supported
    if not available():
        return []
    if _supported is None:
        _supported = tuple(GGMLType(t) for t in _cpu.supported_types())
    return list(_supported)


def row_decoder_types() -> list[int]:
    """ggml type ids whose rows the extension decodes to float natively (embedding lookups); [] without it."""
    return list(require().row_decoder_types()) if available() else []


def check_weight(name: str, raw: torch.Tensor, ggml_type: GGMLType, rows: int, cols: int) -> int:
    """Row bytes of a raw weight of `rows` x `cols` `ggml_type` elements; ValueError naming `name` if it is not one."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU uint8 tensor of raw GGUF blocks, got {type(raw).__name__} "
                         f"{getattr(raw, 'dtype', '')} {getattr(raw, 'device', '')}")
    if ggml_type not in (_supported or supported_types()):
        raise ValueError(f"{name}: ggml type {ggml_type.name} has no native kernel; supported: "
                         f"{[t.name for t in supported_types()]}")
    row_bytes = row_nbytes(ggml_type, cols)
    if raw.numel() != rows * row_bytes:
        raise ValueError(f"{name}: {raw.numel()} bytes, but {rows} rows of {cols} {ggml_type.name} elements "
                         f"need {rows * row_bytes}")
    if not raw.is_contiguous():
        raise ValueError(f"{name}: raw weight bytes must be contiguous")
    return row_bytes


def _float_input(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def quant_linear(x: torch.Tensor, weight_raw: torch.Tensor, ggml_type, out_features: int, in_features: int) -> torch.Tensor:
    """x float32 [M, in_features] @ dequant(weight)[out_features, in_features]^T -> float32 [M, out_features]."""
    mod = require()
    ggml_type = resolve_type(ggml_type)
    row_bytes = check_weight("weight", weight_raw, ggml_type, out_features, in_features)
    if x.dim() != 2:
        raise ValueError(f"x: expected [M, {in_features}], got shape {tuple(x.shape)}")
    x = _float_input("x", x, (x.shape[0], in_features))
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    mod.quant_linear(x.numpy(), x.shape[0], weight_raw.numpy(), int(ggml_type), out_features, in_features,
                     row_bytes, out.numpy())
    return out


def moe_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                gate_raw: torch.Tensor, gate_type, up_raw: torch.Tensor, up_type,
                down_raw: torch.Tensor, down_type, n_experts: int, hidden: int, intermediate: int,
                routed_scale: float = 1.0, shared: tuple | None = None) -> torch.Tensor:
    """Routed experts: out[t] = routed_scale * sum_j w[t,j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
    e = topk_ids[t,j], plus, with `shared` = (gate_raw, gate_type, up_raw, up_type, down_raw, down_type,
    shared_intermediate), that shared expert's output for x[t], computed in the same native passes.

    gate/up are the raw [n_experts, intermediate, hidden] stacks, down the [n_experts, hidden, intermediate] one.
    """
    mod = require()
    types = [resolve_type(t) for t in (gate_type, up_type, down_type)]
    gate_rb = check_weight("gate", gate_raw, types[0], n_experts * intermediate, hidden)
    up_rb = check_weight("up", up_raw, types[1], n_experts * intermediate, hidden)
    down_rb = check_weight("down", down_raw, types[2], n_experts * hidden, intermediate)
    if x.dim() != 2 or topk_ids.dim() != 2:
        raise ValueError(f"x must be [T, {hidden}] and topk_ids [T, k]; got {tuple(x.shape)} and {tuple(topk_ids.shape)}")
    T, k = topk_ids.shape
    x = _float_input("x", x, (T, hidden))
    ids = topk_ids.detach().to(device="cpu", dtype=torch.int64).contiguous()
    weights = _float_input("topk_weights", topk_weights, (T, k))
    shared_args = None
    if shared is not None:
        s_gate, s_gate_type, s_up, s_up_type, s_down, s_down_type, s_width = shared
        s_types = [resolve_type(t) for t in (s_gate_type, s_up_type, s_down_type)]
        shared_args = (s_gate.numpy(), int(s_types[0]), check_weight("shared gate", s_gate, s_types[0], s_width, hidden),
                       s_up.numpy(), int(s_types[1]), check_weight("shared up", s_up, s_types[1], s_width, hidden),
                       s_down.numpy(), int(s_types[2]), check_weight("shared down", s_down, s_types[2], hidden, s_width),
                       s_width)
    out = torch.empty(T, hidden, dtype=torch.float32)
    mod.moe_forward(x.numpy(), T, hidden, ids.numpy(), weights.numpy(), k,
                    gate_raw.numpy(), int(types[0]), gate_rb, up_raw.numpy(), int(types[1]), up_rb,
                    down_raw.numpy(), int(types[2]), down_rb, n_experts, intermediate, out.numpy(),
                    float(routed_scale), shared_args)
    return out


FLOAT_WEIGHT_TYPES = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}


def _describe(t) -> str:
    """What was passed, for error messages: type, shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def head_linear(x: torch.Tensor, weight_raw: torch.Tensor, ggml_type, heads: int, out_features: int,
                in_features: int, head_stride: int | None = None) -> torch.Tensor:
    """Per-head linears on the kernel pool: out[h] = x[h] @ W_h^T, x float [H, M, K] -> float32 [H, M, N].

    weight_raw: CPU uint8 rows of `ggml_type` (raw GGUF blocks, or the bytes of a float tensor with
    ggml_type F32/F16/BF16); W_h is `out_features` rows starting at byte h * head_stride (default:
    the heads follow each other). MLA's absorbed W_UK / W_UV products on the CPU.
    """
    mod = require()
    ggml_type = resolve_type(ggml_type)
    if ggml_type not in (_supported or supported_types()):
        raise ValueError(f"head_linear: ggml type {ggml_type.name} has no native kernel")
    row_bytes = row_nbytes(ggml_type, in_features)
    head_bytes = out_features * row_bytes
    head_stride = head_bytes if head_stride is None else int(head_stride)
    spanned_rows = (heads - 1) * head_stride // row_bytes + out_features
    if head_stride == head_bytes:
        check_weight("weight", weight_raw, ggml_type, spanned_rows, in_features)
    elif not (isinstance(weight_raw, torch.Tensor) and weight_raw.numel() >= spanned_rows * row_bytes):
        raise ValueError(f"head_linear: {heads} heads of {out_features} rows, {head_stride} bytes apart, need "
                         f"{spanned_rows * row_bytes} bytes of weight, got {_describe(weight_raw)}")
    if x.dim() != 3 or x.shape[0] != heads or x.shape[2] != in_features:
        raise ValueError(f"head_linear: x must be [{heads}, M, {in_features}], got {_describe(x)}")
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    out = torch.empty(heads, x.shape[1], out_features, dtype=torch.float32)
    mod.head_linear(x.numpy(), x.shape[1], weight_raw.numpy(), int(ggml_type), heads, out_features, in_features,
                    row_bytes, head_stride, out.numpy(), out_features)
    return out


def mla_prepare(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, rotations: torch.Tensor,
                interleaved: bool, heads: int, nope: int, rope: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's steps between its linears and the absorbed W_UK product, in one native pass, for T tokens.

    q [T, heads * (nope + rope)] (q_b_proj's output), kv [T, kv_lora + rope] (kv_a_proj_with_mqa's),
    rotations complex64 [T, rope / 2] (RopeTable rows) -> (q_nope [H, T, nope], query [H, T, kv_lora + rope]
    with only its rope columns written (rotated), cache rows [T, kv_lora + rope] = RMSNorm(latent) *
    norm_weight | rotated key rope). All CPU float32.
    """
    mod = require()
    T, kv_lora = kv.shape[0], kv.shape[-1] - rope
    ok = (q.dim() == kv.dim() == 2 and q.shape == (T, heads * (nope + rope)) and kv_lora > 0
          and tuple(norm_weight.shape) == (kv_lora,) and tuple(rotations.shape) == (T, rope // 2)
          and q.dtype == kv.dtype == norm_weight.dtype == torch.float32 and rotations.dtype == torch.complex64
          and q.device.type == kv.device.type == rotations.device.type == "cpu")
    if not ok:
        raise ValueError(f"mla_prepare: need CPU float32 q [T, {heads} * ({nope} + {rope})], kv [T, kv_lora + {rope}], "
                         f"norm weight [kv_lora] and complex64 rotations [T, {rope // 2}]; got q {_describe(q)}, kv "
                         f"{_describe(kv)}, weight {_describe(norm_weight)}, rotations {_describe(rotations)}")
    q, kv, rot = q.contiguous(), kv.contiguous(), torch.view_as_real(rotations.contiguous())
    q_nope = torch.empty(heads, T, nope)
    query = torch.empty(heads, T, kv_lora + rope)
    rows = torch.empty(T, kv_lora + rope)
    mod.mla_prepare(q.numpy(), kv.numpy(), T, heads, nope, rope, kv_lora, norm_weight.contiguous().numpy(), float(eps),
                    rot.numpy(), bool(interleaved), q_nope.numpy(), query.numpy(), rows.numpy())
    return q_nope, query, rows


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, value_dim: int, scale: float) -> torch.Tensor:
    """One-token MLA attention on the kernel pool: q float32 [H, D], cache float32 rows [S, D] (the first
    value_dim values of a row are its value) -> float32 [H, value_dim] = softmax(scale * q @ cache^T) @ cache[:, :value_dim]."""
    mod = require()
    ok = (isinstance(q, torch.Tensor) and isinstance(cache, torch.Tensor) and q.dim() == 2 and cache.dim() == 2
          and q.shape[1] == cache.shape[1] and q.dtype == cache.dtype == torch.float32
          and q.device.type == cache.device.type == "cpu" and 0 < value_dim <= q.shape[1] and cache.shape[0] > 0)
    if not ok:
        raise ValueError(f"mla_decode_attention: need CPU float32 q [H, D] and cache [S>0, D] with 0 < value_dim <= D, "
                         f"got q {_describe(q)}, cache {_describe(cache)}, value_dim {value_dim}")
    q, cache = q.contiguous(), cache.contiguous()
    out = torch.empty(q.shape[0], value_dim, dtype=torch.float32)
    mod.mla_decode_attention(q.numpy(), q.shape[0], cache.numpy(), cache.shape[0], q.shape[1], value_dim, float(scale),
                             out.numpy())
    return out


def mla_prefill_attention(q: torch.Tensor, cache: torch.Tensor, n_tokens: int, value_dim: int,
                          scale: float) -> torch.Tensor:
    """A prefill chunk's causal MLA attention on the kernel pool: q float32 [H * T, D] head-major (row
    h * T + t) for the chunk's T = n_tokens tokens, the last T of the cache rows [S, D] -> float32
    [H * T, value_dim]. Token t sees rows 0..S-T+t; its output equals mla_decode_attention's for it."""
    mod = require()
    ok = (isinstance(q, torch.Tensor) and isinstance(cache, torch.Tensor) and q.dim() == 2 and cache.dim() == 2
          and q.shape[1] == cache.shape[1] and q.dtype == cache.dtype == torch.float32
          and q.device.type == cache.device.type == "cpu" and 0 < value_dim <= q.shape[1]
          and 0 < n_tokens <= cache.shape[0] and q.shape[0] % n_tokens == 0)
    if not ok:
        raise ValueError(f"mla_prefill_attention: need CPU float32 q [H * T, D] and cache [S >= T, D] with "
                         f"0 < value_dim <= D, got q {_describe(q)}, cache {_describe(cache)}, T {n_tokens}, "
                         f"value_dim {value_dim}")
    q, cache = q.contiguous(), cache.contiguous()
    heads = q.shape[0] // n_tokens
    out = torch.empty(q.shape[0], value_dim, dtype=torch.float32)
    mod.mla_prefill_attention(q.numpy(), heads, n_tokens, cache.numpy(), cache.shape[0] - n_tokens, q.shape[1],
                              value_dim, float(scale), out.numpy())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of a CPU float32 tensor, times `weight` (float32 [n]), as
    torch.nn.functional.rms_norm computes it: one native call instead of a handful of torch ops."""
    mod = require()
    n = weight.numel()
    ok = (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
          and x.dim() >= 1 and x.shape[-1] == n and weight.dim() == 1 and n > 0)
    if not ok:
        raise ValueError(f"rms_norm: need CPU float32 x [..., n] and weight [n], got x {_describe(x)}, weight "
                         f"{_describe(weight)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    mod.rms_norm(x.numpy(), x.numel() // n, n, weight.contiguous().numpy(), float(eps), out.numpy())
    return out


ROUTE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, method: str, sigmoid: bool, n_group: int,
              topk_group: int, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router's choice from CPU float32 logits [T, E]: (ids int64 [T, top_k] best first, weights
    float32 [T, top_k]), as operators/moe_gate.MoEGate computes it with torch ops."""
    mod = require()
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError(f"moe_route: logits must be CPU float32 [T, experts], got {_describe(logits)}")
    if method not in ROUTE_METHODS:
        raise ValueError(f"moe_route: unknown method {method!r}; known: {list(ROUTE_METHODS)}")
    logits = logits.contiguous()
    T, E = logits.shape
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
        if bias.shape != (E,):
            raise ValueError(f"moe_route: bias must be [{E}], got {_describe(bias)}")
    ids = torch.empty(T, top_k, dtype=torch.int64)
    weights = torch.empty(T, top_k, dtype=torch.float32)
    mod.moe_route(logits.numpy(), T, E, None if bias is None else bias.numpy(), ROUTE_METHODS[method], bool(sigmoid),
                  n_group or 1, topk_group or 1, top_k, bool(normalize), ids.numpy(), weights.numpy())
    return ids, weights


def _init():
    if not available():
        return
    _cpu.set_num_threads(_default_threads())
    if _cpu.has_iq_tables:
        from ktransformers.kernels import iq_tables

        iq_tables.init(_cpu)


_init()
