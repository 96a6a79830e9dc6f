"""The built extension keeps every AVX2/AVX512 instruction inside the per-ISA kernel code, and
nothing outside that code calls into it directly (only through a table dispatch.cpp chose after
asking the CPU). Read from the disassembly of the module, so it holds whatever CPU runs the test;
tests/emulated_cpus.sh checks the same by running on emulated CPUs.
"""

from __future__ import annotations

import re

import pytest


ISA_CODE = re.compile(r"kt::(avx2|vnni)::")
# VEX/EVEX-encoded instructions (AVX and later: every mnemonic starting with v, mask-register
# moves) and the BMI1/BMI2 scalar ones, none of which a baseline x86-64 CPU has.
BEYOND_BASELINE = re.compile(r"^(v[a-z]\w*|k(mov|or|and|not|shift|test|unpck)\w*|shlx|shrx|sarx|rorx|pdep|pext|andn|bzhi|blsi|blsr|blsmsk)(\s|$)")
BRANCH_TARGET = re.compile(r"<([^>+]*)(\+0x[0-9a-f]+)?>")


@pytest.fixture(scope="module")
def functions(module_disassembly):
    """Function name -> its instructions (conftest's module_disassembly without the addresses)."""
    found = {name: [ins for _, ins in lines] for name, lines in module_disassembly.items()}
    assert any(ISA_CODE.search(name) for name in found), "no kt::avx2/kt::vnni symbols: is the module stripped?"
    return found


def test_only_kernel_code_uses_instructions_beyond_baseline_x86_64(functions):
    offenders = {name: ins for name, lines in functions.items() if not ISA_CODE.search(name)
                 for ins in lines if BEYOND_BASELINE.match(ins)}
    assert not offenders, f"baseline code with AVX/BMI instructions (inline or template code built for an ISA?): {offenders}"


def test_nothing_outside_the_kernels_calls_into_them(functions):
    calls = {}
    for name, lines in functions.items():
        if ISA_CODE.search(name):
            continue
        for ins in lines:
            if ins.startswith(("call", "jmp")) and (target := BRANCH_TARGET.search(ins)) and ISA_CODE.search(target.group(1)):
                calls.setdefault(name, []).append(target.group(1))
    assert not calls, f"ISA code reached without the CPU check (static initialisers, table fills?): {calls}"
