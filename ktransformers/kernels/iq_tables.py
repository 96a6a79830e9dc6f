"""Hands the IQ codebooks of the installed gguf package to the native kernels.

The grids, sign patterns and non-linear values are format facts; they are read from
``gguf.quants`` at run time instead of being pasted into our C++ (see csrc/iq_tables.h).
"""

from __future__ import annotations

import numpy as np
from gguf import quants

_initialised: set[str] = set()


def _grid(cls, rows: int, cols: int, dtype, allowed: set[int]) -> bytes:
    cls.init_grid()
    grid = np.asarray(cls.grid, dtype=np.float32).reshape(rows, cols)
    values = set(np.unique(grid).tolist())
    if not values <= allowed:
        raise RuntimeError(
            f"gguf.quants.{cls.__name__}.grid holds unexpected values {sorted(values - allowed)}; "
            "the native kernels assume the standard codebook"
        )
    return grid.astype(dtype).tobytes()


def collect_tables() -> dict[str, bytes]:
    """Table name -> raw bytes, in the layout kt_init_iq_tables expects."""
    magnitudes2 = {8, 25, 43}
    ksigns = bytes(quants.IQ2_XXS.ksigns)
    if len(ksigns) != 128:
        raise RuntimeError(f"gguf.quants.IQ2_XXS.ksigns has {len(ksigns)} bytes, expected 128")
    return {
        "iq1s_grid": _grid(quants.IQ1_S, 2048, 8, np.int8, {-1, 0, 1}),
        "iq2xxs_grid": _grid(quants.IQ2_XXS, 256, 8, np.uint8, magnitudes2),
        "iq2xs_grid": _grid(quants.IQ2_XS, 512, 8, np.uint8, magnitudes2),
        "iq3xxs_grid": _grid(quants.IQ3_XXS, 256, 4, np.uint8, {4, 12, 20, 28, 36, 44, 52, 62}),
        "iq2s_grid": _grid(quants.IQ2_S, 1024, 8, np.uint8, magnitudes2),
        "iq3s_grid": _grid(quants.IQ3_S, 512, 4, np.uint8, {1, 3, 5, 7, 9, 11, 13, 15}),
        "ksigns": ksigns,
        "iq4nl_values": np.array(quants.IQ4_NL.kvalues, dtype=np.int8).tobytes(),
    }


def init(module) -> None:
    """Store every table in the native extension ``module`` (has ``init_iq_table``); idempotent."""
    key = getattr(module, "__name__", repr(module))
    if key in _initialised:
        return
    for name, data in collect_tables().items():
        module.init_iq_table(name, data)
    _initialised.add(key)
