"""Backend registry: the names optimize rules use, mapped to operator classes.

Modules are imported lazily so a missing native build only matters when a rule asks for it.
"""

import importlib

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
