"""Weight prefetch is tuned per vendor (kernels/csrc/prefetch.cpp: rows ahead from the callers,
bytes ahead inside the k-quant/Q8_0 kernels, each settable with KT_PREFETCH_ROWS / KT_PREFETCH_BYTES).
Whatever the setting, decode results must keep the same bits: each setting is read once per
process, so each runs in its own child, and every child's outputs must match the first's."""

import json
import os
import subprocess
import sys

import pytest

from ktransformers import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")

CHILD = r"""
import hashlib, json
import numpy as np
import torch
from ktransformers import kernels
from ktransformers.gguf import GGMLType as G, QuantTensor, random_quant_bytes
from ktransformers.operators.cpu_quant import CpuQuantExperts, CpuQuantLinear, LinearGroup

rng = np.random.default_rng(7)
def tensor(name, t, shape):
    return QuantTensor(name, t, shape, random_quant_bytes(t, shape, rng, scale=0.05))
digest = {}
for t in (G.Q8_0, G.Q4_K, G.Q6_K, G.Q2_K, G.Q3_K, G.IQ1_S, G.IQ2_XXS):
    if t not in kernels.supported_types():
        continue
    x = torch.from_numpy(rng.standard_normal((1, 2048)).astype(np.float32))
    linears = [CpuQuantLinear(tensor(f"w{i}", t, (40 + 8 * i, 2048)), None) for i in range(2)]
    x2 = torch.from_numpy(rng.standard_normal((2, 2048)).astype(np.float32))
    # one row, two rows (two sequences' decode: the multi-row forms), two matrices in one call
    outs = [linears[0](x), linears[0](x2), *LinearGroup.of(*linears)(x)]
    if t == G.Q8_0:  # rows shorter than the kernel's prefetch step (MLA's W_UK)
        outs.append(CpuQuantLinear(tensor("w_uk", t, (64, 128)), None)(x[:, :128]))
    experts = CpuQuantExperts(tensor("g", t, (4, 256, 512)), tensor("u", t, (4, 256, 512)), tensor("d", t, (4, 512, 256)))
    ids, weights = torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])
    outs.append(experts(x[:, :512], ids, weights))
    digest[t.name] = hashlib.sha256(b"".join(o.numpy().tobytes() for o in outs)).hexdigest()
print(json.dumps(digest))
"""

SETTINGS = [{}, {"KT_PREFETCH_ROWS": "0", "KT_PREFETCH_BYTES": "0"}, {"KT_PREFETCH_ROWS": "1", "KT_PREFETCH_BYTES": "0"},
            {"KT_PREFETCH_ROWS": "2", "KT_PREFETCH_BYTES": "4096"}, {"KT_PREFETCH_ROWS": "0", "KT_PREFETCH_BYTES": "1280"}]


def test_prefetch_settings_keep_the_bits():
    results = []
    for setting in SETTINGS:
        # one kernel table for all: the startup timing may pick the gather forms in one child and
        # not in another, and those sum in another order
        env = {**os.environ, "KT_CPU_INFER": "2", "KT_CPU_ISA": kernels.cpu_features()["isa"], **setting}
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert results[0], "no type was tested"
    for setting, digest in zip(SETTINGS[1:], results[1:]):
        assert digest == results[0], f"{setting or 'defaults'} changed the results of " + \
            ", ".join(t for t in digest if digest[t] != results[0].get(t))
