"""Shared pytest fixtures: tiny synthetic DeepSeek models, built once per test session.

    def test_something(tiny_model_dir):            # default: DeepSeek-V3 layout, all F32
        model = open_gguf(tiny_model_dir)           # tiny_model_dir / "model.gguf", config.json, tokenizer...

    def test_quantized(tiny_model):                 # factory, cached by its arguments
        path = tiny_model(quant_mix="q4_k_m")                         # Q4_K/Q6_K like llama.cpp's Q4_K_M
        path = tiny_model(quant_mix="ud-iq1_s", arch="deepseek_v3")   # IQ1_S/IQ2_XXS/Q2_K experts
        path = tiny_model(arch="deepseek_v2", split=2, kv_b_split=True, num_hidden_layers=2)

`tiny_model(quant_mix="f32", arch="deepseek_v3", seed=0, split=None, kv_b_split=False, **config_overrides)`
returns the directory written by `ktransformers.tools.make_tiny_model.make_tiny_model`; quant mixes:
"f32", "q8_0", "q4_k_m", "ud-iq1_s"; archs: "deepseek_v3", "deepseek_v2". Treat the directories as
read-only: they are shared by every test of the session.

`isa`: runs a test once per native kernel table this CPU can run (avx512vnni+gather, avx512vnni,
avx2), with that table selected; none when the extension is not built.

`module_disassembly`: the built extension's functions as {demangled name: [(address, instruction)]}
(objdump -d -C); skips without the extension or binutils.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from ktransformers import kernels
from ktransformers.tools.make_tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def module_disassembly() -> dict[str, list[tuple[int, str]]]:
    if kernels._cpu is None:
        pytest.skip("the native extension is not built")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", kernels._cpu.__file__],
                          capture_output=True, text=True, check=True).stdout
    function, instruction = re.compile(r"^[0-9a-f]+ <(.*)>:$"), re.compile(r"^\s*([0-9a-f]+):\t(.*)$")
    functions, current = {}, None
    for line in text.splitlines():
        if m := function.match(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := instruction.match(line)):
            current.append((int(m.group(1), 16), " ".join(m.group(2).split())))
    return functions


@pytest.fixture(params=kernels.cpu_features().get("available_isas", []))
def isa(request):
    """Selects each kernel table in turn, then restores the one that was active."""
    mod = kernels.require()
    before = mod.isa()
    mod.select_isa(request.param)
    yield request.param
    mod.select_isa(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory fixture: `tiny_model(quant_mix=..., arch=..., seed=..., split=..., **overrides) -> Path`."""
    built = {}

    def build(quant_mix="f32", arch="deepseek_v3", seed=0, split=None, kv_b_split=False, **config_overrides):
        key = (quant_mix, arch, seed, split, kv_b_split, json.dumps(config_overrides, sort_keys=True))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}-{quant_mix}")
            built[key] = make_tiny_model(directory, arch, quant_mix, seed, split, kv_b_split, **config_overrides)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model):
    """Directory of the default tiny model: DeepSeek-V3 layout, F32 weights, single model.gguf."""
    return tiny_model()
