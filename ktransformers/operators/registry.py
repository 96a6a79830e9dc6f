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


def _native_refusal(tensors):
    """Why the native kernels cannot take these tensors (None when they can)."""
    from ktransformers import kernels

    if not kernels.available():
        return kernels.unavailable_reason()
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
        reason = _native_refusal([weight])
        if reason:
            log.warning("%s: using the torch backend instead of cpu_quant (%s)", weight.name, reason)
            name = "torch"
    return linear_backend(name)(weight, bias, device, dtype, **kwargs)


def build_experts(name, gate, up, down, device, dtype, **kwargs):
    """An experts backend instance. No silent fallback: dequantizing every routed expert of a
    large model to floats would need many times the GGUF's size in RAM."""
    if name == "cpu_quant":
        reason = _native_refusal([gate, up, down])
        if reason:
            raise ValueError(f"routed experts {gate.name}: cpu_quant cannot run them ({reason}); "
                             f"use an optimize rule with backend: torch for them (dequantizes them to floats)")
    return experts_backend(name)(gate, up, down, device, dtype, **kwargs)
