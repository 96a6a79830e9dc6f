"""ktransformers: run DeepSeek-V3/R1 MoE models from GGUF files on one workstation.

Routed experts run on the CPU with quantized SIMD kernels, the rest (MLA attention,
shared experts, dense layers) on the GPU when there is one, and the model is served
through an OpenAI-compatible streaming API (see chat_openai.py).
"""

__version__ = "0.2.1.post1"
