"""torch's OpenMP threads must not spin against the native pool: `import ktransformers` before torch
makes them sleep (OMP_WAIT_POLICY=PASSIVE); torch imported first with spinning threads is reported."""

import json
import os
import subprocess
import sys

import pytest

from ktransformers import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native CPU kernels not built")

# argv: the module imported first, torch's thread count. Prints the policy seen, how many OpenMP
# warnings building cpu_quant linears raised, and the CPU seconds the process burnt in a loop of
# small parallel torch ops separated by sleeps (spinning workers burn CPU through the sleeps).
SCRIPT = """
import sys
__import__(sys.argv[1])
import json, os, resource, time, warnings, numpy as np, torch
from types import SimpleNamespace
from ktransformers.gguf.ggml_types import GGMLType
from ktransformers.operators.cpu_quant import CpuQuantLinear
torch.set_num_threads(int(sys.argv[2]))

def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

a = torch.randn(256, 256)
a @ a
before = cpu_seconds()
for _ in range(60):
    a @ a
    time.sleep(0.003)
burnt = cpu_seconds() - before

w = SimpleNamespace(name="blk.0.attn_output.weight", ggml_type=GGMLType.F32, shape=(4, 8),
                    data=np.arange(32, dtype=np.float32).view(np.uint8).reshape(4, 32))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        y = CpuQuantLinear(w, None)(torch.ones(1, 8))
assert torch.equal(y, torch.arange(32.0).view(4, 8).sum(1, keepdim=True).T), y
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_s": burnt, "warnings": sum(
    issubclass(c.category, RuntimeWarning) and "OMP_WAIT_POLICY" in str(c.message) for c in caught)}))
"""


def run(first: str, threads: int = 2, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, first, str(threads)], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no OpenMP worker to spin")
def test_ktransformers_first_makes_torch_threads_sleep_and_torch_first_is_reported():
    ours_first, torch_first = run("ktransformers"), run("torch")
    assert ours_first["policy"] == "PASSIVE" and ours_first["warnings"] == 0
    assert torch_first["policy"] is None and torch_first["warnings"] == 1  # once, not per linear
    # the policy took effect in libgomp: sleeping workers burn far less CPU than spinning ones
    assert ours_first["cpu_s"] < 0.5 * torch_first["cpu_s"], (ours_first, torch_first)


def test_an_explicit_policy_is_kept_and_spinning_reported():
    result = run("ktransformers", OMP_WAIT_POLICY="active")
    assert result["policy"] == "active" and result["warnings"] == 1


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "0"}])
def test_passive_openmp_is_not_reported(env):
    assert run("torch", **env)["warnings"] == 0


def test_single_torch_thread_is_not_reported():
    assert run("torch", threads=1)["warnings"] == 0
