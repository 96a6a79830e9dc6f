"""Quantize the demo model's f32 GGUF with llama.cpp's llama-quantize (run as a tool, built from source).

    python -m ktransformers.tools.demo_model.quantize --f32 demo-f32.gguf --out DIR [--llama-cpp-bin DIR]

Writes DIR/demo-q4_k_m.gguf (llama.cpp's Q4_K_M mix) and DIR/demo-ud-iq1_s.gguf (Unsloth's UD-IQ1_S
recipe: routed gate/up experts IQ1_S, routed down experts IQ2_XXS, Q2_K in the first MoE layer,
the rest as Q4_K_M), both with an importance matrix from llama-imatrix over chats drawn from the
task generator. Without --llama-cpp-bin (or $LLAMA_CPP_BIN) llama.cpp's sources are taken from the
llama-cpp-python sdist on PyPI (which vendors them) and only llama-quantize and llama-imatrix are
built, with cmake, into --work (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
from pathlib import Path

from ..llama_cpp import build, llama_cpp_source
from .task import make_messages, random_problem, reply
from .tokenizer import render_chat

EOS = "<｜end▁of▁sentence｜>"
UD_IQ1_S_TYPES = [r"blk\.1\.ffn_down_exps=q2_k", "ffn_down_exps=iq2_xxs", "ffn_gate_exps=iq1_s", "ffn_up_exps=iq1_s"]


def build_llama_cpp(work: Path) -> Path:
    """The bin directory of a llama.cpp build holding llama-quantize and llama-imatrix."""
    source = llama_cpp_source(work)
    return build(source, source / "build", ["llama-quantize", "llama-imatrix"], ["-DGGML_NATIVE=OFF"])


def calibration_text(n: int = 300, seed: int = 99) -> str:
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        problem = random_problem(rng)
        chats.append(render_chat(make_messages(problem, rng, long_context=i % 3 == 0)) + reply(problem) + EOS)
    return "\n".join(chats)


def quantize(f32_gguf: Path, out: Path, bin_dir: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    calibration = out / "calibration.txt"
    imatrix = out / "imatrix.gguf"
    calibration.write_text(calibration_text())
    # run in `out` with relative names: llama-quantize records the imatrix and dataset paths in the file
    f32_gguf, bin_dir = Path(f32_gguf).resolve(), Path(bin_dir).resolve()
    subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(f32_gguf), "-f", calibration.name, "-o", imatrix.name,
                    "-c", "512", "-t", "2", "--parse-special", "--seed", "0"], check=True, cwd=out)
    written = []
    for variant, overrides in (("q4_k_m", []), ("ud-iq1_s", UD_IQ1_S_TYPES)):
        target = out / f"demo-{variant}.gguf"
        command = [str(bin_dir / "llama-quantize"), "--imatrix", imatrix.name,
                   "--override-kv", f"general.name=str:ktransformers-demo-{variant}"]
        for override in overrides:
            command += ["--tensor-type", override]
        subprocess.run(command + [str(f32_gguf), target.name, "Q4_K_M", "2"], check=True, cwd=out)
        written.append(target)
    calibration.unlink()
    imatrix.unlink()
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--f32", type=Path, required=True, help="the f32 GGUF written by export.py --types f32")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"))
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ktransformers" / "llama.cpp")
    a = p.parse_args(argv)
    bin_dir = a.llama_cpp_bin or build_llama_cpp(a.work)
    for path in quantize(a.f32, a.out, bin_dir):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
