"""Rebuild the shipped demo files from a training run: export (own GGUF writer) + quantize (llama.cpp).

    python -m ktransformers.tools.demo_model.train --out /tmp/demo-train --steps 1510     # ~3 min on one GPU
    python -m ktransformers.tools.demo_model.build --train-dir /tmp/demo-train [--out ktransformers/demo/model]

Writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json, train_log.json,
demo-bf16.gguf (the reference), demo-q8_0.gguf, demo-q4_k_m.gguf and demo-ud-iq1_s.gguf.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .export import export
from .quantize import build_llama_cpp, quantize

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "train_log.json")
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "demo" / "model"


def build(train_dir: Path, out: Path, llama_cpp_bin: Path | None, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(train_dir / name, out / name)
    export(train_dir, out, ("bf16", "q8_0"))
    with tempfile.TemporaryDirectory() as scratch:
        f32 = export(train_dir, Path(scratch), ("f32",))[0]
        quantize(f32, out, llama_cpp_bin or build_llama_cpp(work))
    for path in sorted(out.glob("*.gguf")):
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"))
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ktransformers" / "llama.cpp")
    a = p.parse_args(argv)
    build(a.train_dir, a.out, a.llama_cpp_bin, a.work)


if __name__ == "__main__":
    main()
