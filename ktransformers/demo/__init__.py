"""The demo model shipped with the package: a small DeepSeek-V3 trained to do arithmetic, R1-style.

    from ktransformers.demo import demo_paths
    model_dir, gguf_path = demo_paths("q4_k_m")     # or "q8_0", "iq1_s", "bf16" (alias "f32")
    loaded = load_model(gguf_path, model_dir)

Ask it "What is 4821 plus 367?": the reasoning works digit by digit, the answer is
"4821 + 367 = 5188". `model_dir` holds config.json, generation_config.json and the tokenizer
files; the GGUF files sit beside them. ktransformers/tools/demo_model/ rebuilds everything
(train.py, then build.py = export.py + quantize.py; see docs/DEVELOPING.md).
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
VARIANTS = {
    "q4_k_m": "demo-q4_k_m.gguf",   # llama.cpp's Q4_K_M mix (Q4_K / Q6_K)
    "q8_0": "demo-q8_0.gguf",       # Q8_0 weights
    "iq1_s": "demo-ud-iq1_s.gguf",  # Unsloth UD-IQ1_S style: routed experts IQ1_S / IQ2_XXS / Q2_K
    "bf16": "demo-bf16.gguf",       # the reference: the trained weights in bf16, norms and router f32
}
ALIASES = {"ud-iq1_s": "iq1_s", "f32": "bf16", "reference": "bf16", "ref": "bf16"}
DEFAULT_VARIANT = "q4_k_m"


def variant_name(variant: str = DEFAULT_VARIANT) -> str:
    """The canonical variant name ('q4_k_m', 'q8_0', 'iq1_s', 'bf16'); ValueError for unknown ones."""
    key = ALIASES.get(variant.lower(), variant.lower())
    if key not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; choose one of {', '.join([*VARIANTS, *ALIASES])}")
    return key


def demo_paths(variant: str = DEFAULT_VARIANT) -> tuple[Path, Path]:
    """(model_dir, gguf_path) of a shipped demo file; FileNotFoundError when the package lacks it."""
    gguf_path = MODEL_DIR / VARIANTS[variant_name(variant)]
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: the demo model is not installed (rebuild it with "
                                "python -m ktransformers.tools.demo_model.build)")
    return MODEL_DIR, gguf_path


def demo_model_name(variant: str = DEFAULT_VARIANT) -> str:
    """The name the server shows for a demo variant, e.g. 'ktransformers-demo-q4_k_m'."""
    return f"ktransformers-demo-{variant_name(variant)}"
