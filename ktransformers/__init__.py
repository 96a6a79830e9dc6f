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
