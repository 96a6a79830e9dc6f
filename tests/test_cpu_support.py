"""Every x86-64 CPU runs the engine: the kernel table follows the CPU's features, the demo
model answers right on it, a CPU without AVX2/FMA falls back to torch with one log line, a forced
table the CPU lacks is a clear error.

tests/emulated_cpus.sh runs this file under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX512) and
`-cpu Nehalem` (no AVX) with KT_EXPECT_ISA naming the table that CPU must get ("" for none); on
the host it checks the same things against whatever the host has.
"""

from __future__ import annotations

import logging
import os
import re

import pytest

from ktransformers import kernels
from ktransformers.demo import demo_paths
from ktransformers.models.loader import load_model
from ktransformers.operators import registry
from ktransformers.operators.cpu_quant import CpuQuantExperts
from ktransformers.operators.experts import DequantOnUseExperts
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent, TokenEvent
from ktransformers.util.utils import prefill_and_generate

EXPECTED_ISA = os.environ.get("KT_EXPECT_ISA")  # None: not under an emulated CPU leg


def test_the_kernel_table_fits_this_cpu():
    features = kernels.cpu_features()
    if EXPECTED_ISA is not None:
        assert features["isa"] == EXPECTED_ISA, features
    assert features["available"] == bool(features["isa"])
    forced = os.environ.get("KT_CPU_ISA", "").strip()
    if forced:  # a table forced by name (tests pin one this way): that one ("vnni": the VNNI build's plain table)
        assert features["isa"] == ("avx512vnni" if forced == "vnni" else forced), features
        assert features["isa"] in features["available_isas"], features
    else:  # otherwise the best this CPU runs
        assert features["available_isas"][:1] == ([features["isa"]] if features["isa"] else [])


def test_forcing_a_table_this_cpu_cannot_run_is_a_clear_error(monkeypatch):
    runnable = kernels.cpu_features()["available_isas"]
    missing = [name for name in ("avx512vnni+gather", "avx512vnni", "avx2") if name not in runnable]
    if not missing:
        pytest.skip("this CPU runs every kernel table")  # the fake-extension cases in test_registry cover it
    monkeypatch.setenv("KT_CPU_ISA", missing[0])
    with pytest.raises(RuntimeError, match=re.escape(f"KT_CPU_ISA={missing[0]}: this CPU cannot run that kernel table")):
        kernels.require()


@pytest.fixture(scope="module")
def demo():
    """The shipped demo model, Q4_K_M (what `chat_openai.py --demo` serves), with the CPU rules."""
    registry._fallback_logged = False
    return demo_paths("q4_k_m")


def test_a_demo_generation_runs_on_this_cpu(demo, caplog):
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        loaded = load_model(demo[1], demo[0], max_context=256, cpu_infer=2)
    experts = [m for m in loaded.model.modules() if isinstance(m, (CpuQuantExperts, DequantOnUseExperts))]
    assert experts, "the model has routed experts"
    fallback_lines = [r.getMessage() for r in caplog.records if "using the torch backend" in r.getMessage()]
    if kernels.available():
        assert all(isinstance(m, CpuQuantExperts) for m in experts)
        assert not fallback_lines
    else:
        assert all(isinstance(m, DequantOnUseExperts) for m in experts)
        assert len(fallback_lines) == 1 and "native kernels need AVX2+FMA" in fallback_lines[0], fallback_lines

    prompt = build_prompt_ids(loaded.tokenizer, [{"role": "user", "content": "What is 4821 plus 367?"}])
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=120))
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "stop"
    content = "".join(e.content for e in events if isinstance(e, TokenEvent))
    reasoning = "".join(e.reasoning for e in events if isinstance(e, TokenEvent))
    assert content.strip() == "4821 + 367 = 5188" and reasoning.strip()  # right, with its working
