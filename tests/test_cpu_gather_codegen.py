"""The gather forms' codebook gathers start from a fresh zero, not from a register a previous
super-block wrote.

A gather merges into its destination register, so the hardware waits for that register's last
writer. With a constant full mask GCC drops the zero pass-through and may hand the gather an
accumulator, which chains every super-block's gathers to the previous one's sums: the kernel then
runs at gather latency instead of throughput (IQ1_S 2.0 vs 2.7 GB/s on one Sapphire Rapids core).
lb_gather8/lb_gather16 in dot_lowbit.inc prevent it; this reads the built module's disassembly
(as tests/test_cpu_isa_isolation.py does), so it holds whatever CPU runs the test.
"""

from __future__ import annotations

import re

import pytest


JUMP = re.compile(r"^j\w+\s+([0-9a-f]+)\b")
GATHER = re.compile(r"^vp?gather\w+\s+\S+,%(zmm\d+)\{%k\d\}$")
# zero idioms: xor of a register with itself (any width of the same number)
ZERO_IDIOM = re.compile(r"^v(p?xor\w*)\s+%[xyz]mm(\d+),%[xyz]mm(\d+),%[xyz]mm(\d+)$")
REGISTER_MOVE = re.compile(r"^v(movdq[au]\w*|movap[sd]|movup[sd])\s+%[xyz]mm(\d+),%[xyz]mm(\d+)$")


def gather_functions(module_disassembly) -> dict[str, list[tuple[int, str]]]:
    """kt::vnni functions with a gather -> their (address, instruction) lines."""
    return {name: lines for name, lines in module_disassembly.items()
            if "kt::vnni::" in name and any(GATHER.match(ins) for _, ins in lines)}


def register_number(operand: str) -> int:
    return int(re.sub(r"\D", "", operand))


def writes(ins: str, number: int) -> bool:
    """Whether the instruction's destination (AT&T: the last operand) is vector register `number`."""
    last = ins.rsplit(",", 1)[-1] if "," in ins else ""
    m = re.match(r"^%[xyz]mm(\d+)", last)
    return bool(m) and int(m.group(1)) == number


def is_zero_idiom(ins: str, number: int | None = None) -> bool:
    z = ZERO_IDIOM.match(ins)
    return bool(z) and z.group(2) == z.group(3) == z.group(4) and (number is None or int(z.group(2)) == number)


def innermost_loop(lines: list[tuple[int, str]], i: int) -> tuple[int, int] | None:
    """(first, last) line indexes of the smallest backward jump's range around line i."""
    address, best = lines[i][0], None
    index_of = {a: k for k, (a, _) in enumerate(lines)}
    for k in range(i, len(lines)):
        m = JUMP.match(lines[k][1])
        if m and (target := int(m.group(1), 16)) <= address and target in index_of:
            if best is None or k - index_of[target] < best[1] - best[0]:
                best = (index_of[target], k)
    return best


def holds_zero(lines: list[tuple[int, str]], i: int, number: int) -> bool:
    """Whether vector register `number` holds a zero made without dependencies at line i: its last
    writer in the loop around i is a zero idiom, or nothing in that loop writes it and its last
    writer before the loop is one."""
    loop = innermost_loop(lines, i)
    first = loop[0] if loop else 0
    for j in range(i - 1, first - 1, -1):
        if writes(lines[j][1], number):
            return is_zero_idiom(lines[j][1], number)
    if loop and any(writes(ins, number) for _, ins in lines[loop[0]:loop[1] + 1]):
        return False
    for j in range(first - 1, -1, -1):
        if writes(lines[j][1], number):
            return is_zero_idiom(lines[j][1], number)
    return False


def gather_sources(lines: list[tuple[int, str]]) -> list[str]:
    """One line per gather whose destination does not start from a dependency-free zero."""
    targets = {int(m.group(1), 16) for _, ins in lines if (m := JUMP.match(ins))}
    problems = []
    for i, (address, ins) in enumerate(lines):
        if not (g := GATHER.match(ins)):
            continue
        dest = register_number(g.group(1))
        verdict = f"no write of %zmm{dest} in its block (it comes from a previous pass)"
        for j in range(i - 1, -1, -1):
            if lines[j + 1][0] in targets:  # block start: the value may come round a loop's back edge
                break
            prior = lines[j][1]
            if not writes(prior, dest):
                continue
            mv = REGISTER_MOVE.match(prior)
            if is_zero_idiom(prior, dest) or (mv and holds_zero(lines, j, int(mv.group(2)))):
                verdict = None
            else:
                verdict = f"%zmm{dest} last written by `{prior}`"
            break
        if verdict:
            problems.append(f"{address:x} `{ins}`: {verdict}")
    return problems


def test_every_gather_form_is_in_the_module(module_disassembly):
    found = gather_functions(module_disassembly)
    if not found:
        pytest.skip("this build has no AVX512 gather forms")
    for kind in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"):
        assert any(f"{kind}_gather_rows" in name for name in found), kind


def test_gathers_start_from_a_fresh_zero(module_disassembly):
    found = gather_functions(module_disassembly)
    if not found:
        pytest.skip("this build has no AVX512 gather forms")
    problems = {name: p for name, lines in found.items() if (p := gather_sources(lines))}
    assert not problems, f"gathers that wait on an earlier computation: {problems}"
