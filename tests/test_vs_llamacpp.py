"""benchmarks/vs_llamacpp.py's parts that run without llama.cpp: the synthetic GGUF it writes loads in
both layouts' readers (the `gguf` package as oracle), our side of the measurement, the slope, and the
trimmed llama.cpp source tarball (ktransformers/tools/llama_cpp.py)."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from ktransformers.tools import llama_cpp

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import synthetic_model  # noqa: E402
import vs_llamacpp  # noqa: E402

SMALL = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, n_routed_experts=16,
             num_attention_heads=4, q_lora_rank=256, kv_lora_rank=256)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    return synthetic_model.write_gguf(tmp_path_factory.mktemp("vs") / "small.gguf", 1, 2, "q4_k_m", **SMALL)


def test_written_file_is_what_the_gguf_package_reads(small_gguf):
    reader = gguf.GGUFReader(small_gguf)
    names = {t.name: t for t in reader.tensors}
    assert "blk.1.attn_k_b.weight" in names and "blk.1.attn_kv_b.weight" not in names  # today's MLA layout
    assert names["blk.2.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert list(names["blk.2.ffn_down_exps.weight"].shape) == [256, 256, 16]  # ggml order: in, out, experts
    assert reader.fields["deepseek2.block_count"].contents() == 3
    assert reader.fields["deepseek2.leading_dense_block_count"].contents() == 1
    # every tensor's bytes are whole valid blocks: the gguf package decodes them to finite values
    assert all(np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all() for t in reader.tensors)


def test_our_side_reports_every_test(small_gguf):
    out = subprocess.run([sys.executable, str(BENCHMARKS / "vs_llamacpp.py"), "ours", str(small_gguf), "cpu", "2",
                          "16,32", "4", "0,8", "1"], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"rss_bytes", "pp16", "pp32", "tg4@0", "tg4@8"}
    assert all(v > 0 for v in result.values())


def test_slope_is_the_extra_milliseconds_per_moe_layer():
    assert vs_llamacpp.slope_ms({2: 50.0, 4: 25.0}) == pytest.approx(10.0)  # 20 ms -> 40 ms over 2 layers
    assert vs_llamacpp.slope_ms({2: 50.0}) is None and vs_llamacpp.slope_ms({2: 50.0, 4: 0.0}) is None


def test_packed_source_holds_what_cmake_reads_and_not_the_web_ui(tmp_path):
    source = tmp_path / "llama.cpp"
    for path in ("CMakeLists.txt", "ggml/src/ggml-cpu/ops.cpp", "tools/llama-bench/llama-bench.cpp",
                 "tools/ui/dist/index.html", "ggml/src/ggml-vulkan/x.cpp", "docs/big.md"):
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(path)
    archive = llama_cpp.pack_source(source, tmp_path / "src.tar.gz")
    with tarfile.open(archive) as packed:
        names = set(packed.getnames())
    assert {"llama.cpp/CMakeLists.txt", "llama.cpp/ggml/src/ggml-cpu/ops.cpp",
            "llama.cpp/tools/llama-bench/llama-bench.cpp"} <= names
    assert not any(part in name for name in names for part in ("tools/ui", "ggml-vulkan", "docs"))
    unpacked = llama_cpp.unpack_source(archive, tmp_path / "out")
    assert (unpacked / "tools/llama-bench/llama-bench.cpp").read_text() == "tools/llama-bench/llama-bench.cpp"
