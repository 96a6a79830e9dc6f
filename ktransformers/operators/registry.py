"""Backend registry: the names optimize rules use, mapped to operator classes.

Modules are imported lazily so a missing native build only matters when a rule asks for it.
"""

import importlib
import logging

log = logging.getLogger(__name__)

LINEAR_BACKENDS = {
    "torch": "ktransformers.operators.linear:TorchLinear",
    "cpu_quant": "ktransformers.operators.cpu_quant:CpuQuantLinear",
}

EXPERTS_BACKENDS = {
    "torch": "ktransformers.operators.experts:TorchExperts",
    "cpu_quant": "ktransformers.operators.cpu_quant:CpuQuantExperts",
}


def _resolve(table, kind, name):
    try:
        target = table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} backend {name!r}; known: {sorted(table)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def linear_backend(name):
    return _resolve(LINEAR_BACKENDS, "linear", name)


def experts_backend(name):
    return _resolve(EXPERTS_BACKENDS, "experts", name)


# How much slower the torch fallback decodes than the native kernels: benchmarks/torch_fallback.py,
# the routed experts of one DeepSeek-V3-width MoE layer (Q4_K_M), 93-190x on 2 Zen 4 cores and 350x
# on 16 Sapphire Rapids cores, where the kernels run at memory speed; a CPU without AVX2 is slower still.
FALLBACK_SLOWDOWN = "100-350"
_fallback_logged = False


def _log_torch_fallback(reason: str) -> None:
    """One line per process when the native kernels cannot run at all, whatever the rules ask."""
    global _fallback_logged
    if _fallback_logged:
        return
    _fallback_logged = True
    if "AVX2" in reason:
        log.warning("native kernels need AVX2+FMA, which this CPU lacks; using the torch backend, expect decoding "
                    "%s times slower", FALLBACK_SLOWDOWN)
    else:
        log.warning("native kernels unavailable (%s); using the torch backend, expect decoding %s times slower",
                    reason, FALLBACK_SLOWDOWN)


def _native_usable() -> bool:
    """Whether the native kernels run here; a forced kernel table this CPU lacks is an error."""
    from ktransformers import kernels

    kernels.check_isa_override()
    reason = kernels.unavailable_reason()
    if reason:
        _log_torch_fallback(reason)
    return reason is None


def _missing_kernel(tensors):
    """The first tensor whose type has no native kernel, described, or None."""
    from ktransformers import kernels

    supported = kernels.supported_types()
    for t in tensors:
        if t.ggml_type not in supported:
            return f"{t.name} is {t.ggml_type.name}, which has no native kernel"
    return None


def build_linear(name, weight, bias, device, dtype, **kwargs):
    """A linear backend instance; cpu_quant falls back to torch for what the kernels cannot run.

    A linear layer is small next to the experts, so dequantizing one is a fine fallback.
    """
    if name == "cpu_quant":
        if not _native_usable():
            name = "torch"
        elif reason := _missing_kernel([weight]):
            log.warning("%s: using the torch backend instead of cpu_quant (%s)", weight.name, reason)
            name = "torch"
    return linear_backend(name)(weight, bias, device, dtype, **kwargs)


def build_experts(name, gate, up, down, device, dtype, **kwargs):
    """An experts backend instance.

    Where the native kernels cannot run at all (a CPU without AVX2), cpu_quant experts become
    DequantOnUseExperts: slow, but RAM stays at the GGUF's size. A type without a kernel is an
    error instead: silently dequantizing every routed expert of a large model to floats would need
    many times the GGUF's size in RAM.
    """
    if name == "cpu_quant":
        if not _native_usable():
            from ktransformers.operators.experts import DequantOnUseExperts

            return DequantOnUseExperts(gate, up, down, device, dtype)
        if reason := _missing_kernel([gate, up, down]):
            raise ValueError(f"routed experts {gate.name}: cpu_quant cannot run them ({reason}); "
                             f"use an optimize rule with backend: torch for them (dequantizes them to floats)")
    return experts_backend(name)(gate, up, down, device, dtype, **kwargs)
