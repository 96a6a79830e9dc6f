#!/usr/bin/env bash
# The engine on CPUs other than this one, by user-mode emulation (Debian's qemu-user):
#   Haswell  (AVX2+FMA, no AVX512): the native-kernel tests, and a demo generation on the avx2 table;
#   Nehalem  (no AVX at all):       import, the one-line fallback message, a demo generation on torch.
# Emulation shows what the kernels decide and that nothing runs an instruction the CPU lacks
# (qemu raises SIGILL for it, as the real CPU would); its timings mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 >/dev/null; then
    echo "installing qemu-user (Debian package) for the emulated-CPU tests"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-user >/dev/null
fi
# The interpreter itself, not a wrapper script (pyenv shims are shell scripts qemu cannot run).
PY="$(python3 -c 'import sys; print(sys.executable)')"
quiet() { grep -v "TCG doesn't support requested feature" >&2 || true; }   # qemu's notes on CPU flags it ignores
# A leg whose emulated process dies of a signal runs once more: qemu-user 7.2's multi-threaded TCG
# has (rarely) killed a guest inside torch code that passes natively, under AddressSanitizer and on
# rerun. A fault of ours is deterministic enough to die twice; a test failure (exit 1) is never rerun.
# The kernel pool does not spin between calls under emulation (KT_SPIN_US=0): spinning guest threads
# only slow the emulator.
export KT_SPIN_US=0
# Nor does it time native against torch attention (mla.native_prefill_everywhere): emulated timings
# mean nothing, and the probe's matmuls take minutes there; the tests set each choice themselves.
export KT_NATIVE_PREFILL_ATTENTION=1
emulated() {
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -gt 128 ]; then
        echo "== the emulated process died of signal $((rc - 128)); running this leg once more"
        rc=0
        "$@" || rc=$?
    fi
    return "$rc"
}

echo "== emulated Haswell (AVX2, no AVX512)"
KT_EXPECT_ISA=avx2 emulated qemu-x86_64 -cpu Haswell "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_cpu_kernels.py tests/test_cpu_kernels_lowbit.py tests/test_cpu_kernels_kquants.py \
    tests/test_cpu_quant_operators.py tests/test_head_linear.py tests/test_moe_gate_native.py \
    tests/test_mla_cpu_native.py tests/test_embedding_rows.py tests/test_cpu_support.py 2> >(quiet)
echo "== emulated Nehalem (no AVX)"
KT_EXPECT_ISA= emulated qemu-x86_64 -cpu Nehalem "$PY" -m pytest -q -p no:cacheprovider tests/test_cpu_support.py 2> >(quiet)
echo "== emulated Nehalem: chat_openai.py --demo serves a streamed chat"
python3 tests/serve_under_emulation.py --cpu Nehalem --expect-log "native kernels need AVX2+FMA"
