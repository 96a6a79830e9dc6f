"""ktransformers: run DeepSeek-V3/R1 MoE models from GGUF files on one workstation.

Routed experts run on the CPU with quantized SIMD kernels, the rest (MLA attention,
shared experts, dense layers) on the GPU when there is one, and the model is served
through an OpenAI-compatible streaming API (see chat_openai.py).
"""

import os
import sys

__version__ = "0.2.1.post1"

# torch's OpenMP workers (libgomp) busy-wait after each op by default, on the cores the native kernel
# pool needs next: CPU decode ran several times slower. libgomp reads the policy once, when torch
# loads it, so it can only be set here if torch is not imported yet (operators/cpu_quant.py warns
# when it was, with spinning threads). An explicit OMP_WAIT_POLICY is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks for reuse (KT_KEEP_FREED_MEMORY=0: its defaults).

    By default glibc serves large blocks by mmap and returns them (and the heap top beyond 128 KB) to
    the kernel on free, so every prefill chunk faults its large temporaries in again page by page
    (MLA's query rows alone are 38 MB at 128 tokens): measured on a 2-core VM, MLA's prepare step at
    128 tokens took 26 ms that way and 5 ms with the memory kept. The cost is that the process keeps
    its largest step's temporaries (up to a few hundred MB) resident.
    """
    if os.environ.get("KT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 256 << 20)  # blocks up to 256 MB come from the heap...
    mallopt(M_TRIM_THRESHOLD, 512 << 20)  # ...which keeps up to 512 MB free at its top


_keep_freed_memory()
