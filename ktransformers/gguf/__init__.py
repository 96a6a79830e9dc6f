"""GGUF files for ktransformers: ggml types, the memory-mapped reader and quantized tensors.

`dequantize` and `random_quant_bytes` live in sibling modules and are imported on first use.
"""

from .errors import GGUFError
from .ggml_types import GGMLType, block_info, resolve_type, row_nbytes
from .quant_tensor import QuantTensor
from .reader import GGUFModel, open_gguf

__all__ = [
    "GGMLType", "resolve_type", "block_info", "row_nbytes", "QuantTensor", "GGUFModel", "open_gguf",
    "GGUFError", "dequantize", "random_quant_bytes",
]

_LAZY = {"dequantize": ".dequant", "random_quant_bytes": ".random_blocks"}


def __getattr__(name):
    # Lazy so that importing the reader never pulls in (or waits on) the decoders.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
