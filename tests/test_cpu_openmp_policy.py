"""The cpu_quant backend warns when torch's OpenMP threads would busy-wait and starve the native pool."""

import os
import subprocess
import sys

import pytest

from ktransformers import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native CPU kernels not built")

# Builds a cpu_quant linear twice and prints the RuntimeWarnings raised.
SCRIPT = """
import sys, warnings, numpy as np, torch
from types import SimpleNamespace
from ktransformers.gguf.ggml_types import GGMLType
from ktransformers.operators.cpu_quant import CpuQuantLinear
torch.set_num_threads(int(sys.argv[1]))
w = SimpleNamespace(name="blk.0.attn_output.weight", ggml_type=GGMLType.F32, shape=(4, 8),
                    data=np.arange(32, dtype=np.float32).view(np.uint8).reshape(4, 32))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        y = CpuQuantLinear(w, None)(torch.ones(1, 8))
assert torch.equal(y, torch.arange(32.0).view(4, 8).sum(1, keepdim=True).T), y
print("WARNINGS", sum(issubclass(c.category, RuntimeWarning) and "OMP_WAIT_POLICY" in str(c.message) for c in caught))
"""


def count_warnings(threads: int, **env) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split("WARNINGS")[-1])


def test_spinning_openmp_is_reported_once():
    assert count_warnings(2) == 1


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "0"}])
def test_passive_openmp_is_not_reported(env):
    assert count_warnings(2, **env) == 0


def test_single_torch_thread_is_not_reported():
    assert count_warnings(1) == 0
