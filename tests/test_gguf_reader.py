"""The GGUF reader against files written by the `gguf` package (and read back by gguf.GGUFReader)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch

from ktransformers.gguf import GGMLType, GGUFError, QuantTensor, open_gguf
from ktransformers.gguf.reader import read_gguf_file

RNG = np.random.default_rng(1234)
F32_MATRIX = RNG.standard_normal((6, 64), dtype=np.float32)
F16_VECTOR = RNG.standard_normal(96).astype(np.float16)
EXPERTS = RNG.standard_normal((4, 8, 64), dtype=np.float32)  # torch order: (experts, out, in)
I32_VECTOR = np.arange(-5, 5, dtype=np.int32)


def write_gguf(path, tensors=None, metadata=None, arch="testarch", **writer_kwargs):
    """Write a GGUF with the gguf package; `tensors` maps name -> float array or (uint8 blocks, type)."""
    writer = gguf.GGUFWriter(path, arch, **writer_kwargs)
    for key, (adder, value) in (metadata or {}).items():
        getattr(writer, adder)(key, value)
    for name, value in (tensors or {"x": F32_MATRIX}).items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


METADATA = {
    "test.u8": ("add_uint8", 200),
    "test.i8": ("add_int8", -100),
    "test.u16": ("add_uint16", 60000),
    "test.i16": ("add_int16", -30000),
    "test.u32": ("add_uint32", 4_000_000_000),
    "test.i32": ("add_int32", -2_000_000_000),
    "test.u64": ("add_uint64", 2**63 + 5),
    "test.i64": ("add_int64", -(2**62)),
    "test.f32": ("add_float32", 0.5),
    "test.f64": ("add_float64", 1e-300),
    "test.bool": ("add_bool", True),
    "test.string": ("add_string", "héllo ｜▁ 世界 😀"),
    "test.ints": ("add_array", [1, -2, 3]),
    "test.floats": ("add_array", [0.25, -1.5]),
    "test.strings": ("add_array", ["a", "", "<｜User｜>", "Ġthe"]),
    "test.bools": ("add_array", [True, False, True]),
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    q8_experts = gguf.quants.quantize(EXPERTS, GGMLType.Q8_0)
    tensors = {
        "blk.0.weight": F32_MATRIX,
        "blk.0.half": F16_VECTOR,
        "blk.0.ffn_up_exps.weight": (q8_experts, GGMLType.Q8_0),
        "ids": I32_VECTOR,
    }
    return write_gguf(tmp_path_factory.mktemp("sample") / "sample.gguf", tensors, METADATA)


def test_metadata_matches_gguf_reader(sample):
    model = open_gguf(sample)
    oracle = gguf.GGUFReader(sample)
    for key, field in oracle.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        if isinstance(expected, float):
            expected = pytest.approx(expected)
        assert model.metadata[key] == expected, key
    assert model.metadata["test.string"] == "héllo ｜▁ 世界 😀"
    assert model.metadata["test.u64"] == 2**63 + 5
    assert model.metadata["test.strings"] == ["a", "", "<｜User｜>", "Ġthe"]
    assert model.metadata["test.bools"] == [True, False, True]
    assert type(model.metadata["test.ints"][0]) is int and type(model.metadata["test.bool"]) is bool
    assert model.architecture == "testarch"
    assert model.files == [sample]


def test_tensors_match_gguf_reader(sample):
    model = open_gguf(sample)
    oracle = gguf.GGUFReader(sample)
    assert list(model.tensors) == [t.name for t in oracle.tensors]
    for reference in oracle.tensors:
        tensor = model[reference.name]
        assert tensor.ggml_type == reference.tensor_type
        assert tensor.shape == tuple(reversed(reference.shape.tolist()))  # torch order = reversed ne
        assert tensor.nbytes == reference.n_bytes
        assert bytes(tensor.data) == reference.data.tobytes()
    assert model["blk.0.weight"].shape == (6, 64)
    assert model["blk.0.ffn_up_exps.weight"].shape == (4, 8, 64)
    np.testing.assert_array_equal(model["blk.0.weight"].data.view(np.float32).reshape(6, 64), F32_MATRIX)
    np.testing.assert_array_equal(model["ids"].data.view(np.int32), I32_VECTOR)
    assert "ids" in model and "missing" not in model and model.get("missing") is None
    with pytest.raises(KeyError, match="missing"):
        model["missing"]


def test_tensor_data_is_a_view_of_the_memory_map(sample):
    model = open_gguf(sample)
    whole_file = model.parts[0].buffer
    assert whole_file.size == sample.stat().st_size
    for tensor in model.tensors.values():
        assert tensor.data.dtype == np.uint8 and tensor.data.ndim == 1
        assert np.shares_memory(tensor.data, whole_file)
        assert not tensor.data.flags.owndata
        assert tensor.raw().data_ptr() == tensor.data.ctypes.data  # torch view, no copy either
    expert = model["blk.0.ffn_up_exps.weight"]
    assert np.shares_memory(expert.select(2).data, whole_file)


def test_writing_to_a_view_never_reaches_the_file(sample):
    before = hashlib.sha256(sample.read_bytes()).hexdigest()
    tensor = open_gguf(sample)["blk.0.weight"]
    tensor.raw().fill_(7)  # copy-on-write pages: allowed, private to this process
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == before
    assert np.array_equal(open_gguf(sample)["blk.0.weight"].data.view(np.float32).reshape(6, 64), F32_MATRIX)


def test_files_larger_than_memory_can_be_mapped(sample, tmp_path):
    """Real R1 files exceed RAM; the map must not ask the kernel to reserve their size up front."""
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "huge.gguf"
    shutil.copy(sample, path)
    huge = 2 * (psutil.virtual_memory().total + psutil.swap_memory().total)
    os.truncate(path, huge)  # sparse: takes no disk space
    model = open_gguf(path)
    assert model.parts[0].buffer.size == huge
    np.testing.assert_array_equal(model["blk.0.weight"].data.view(np.float32).reshape(6, 64), F32_MATRIX)


def test_select_slices_one_expert_without_copying(sample):
    stack = open_gguf(sample)["blk.0.ffn_up_exps.weight"]
    reference = gguf.quants.dequantize(stack.data.reshape(4, 8, -1), GGMLType.Q8_0)
    for index in range(4):
        expert = stack.select(index)
        assert expert.shape == (8, 64) and expert.ggml_type == GGMLType.Q8_0
        assert expert.nbytes * 4 == stack.nbytes
        np.testing.assert_array_equal(gguf.quants.dequantize(expert.data.reshape(8, -1), GGMLType.Q8_0), reference[index])
    assert stack.select(-1).data.ctypes.data == stack.select(3).data.ctypes.data
    with pytest.raises(IndexError, match="out of range"):
        stack.select(4)
    with pytest.raises(IndexError, match="no dimension"):
        open_gguf(sample)["blk.0.half"].select(0)


def test_dequantize_uses_the_shared_decoders(sample):
    model = open_gguf(sample)
    weight = model["blk.0.weight"].dequantize()
    assert weight.dtype == torch.float32 and weight.shape == (6, 64)
    torch.testing.assert_close(weight, torch.from_numpy(F32_MATRIX))
    experts = model["blk.0.ffn_up_exps.weight"]
    reference = gguf.quants.dequantize(experts.data.reshape(4, 8, -1), GGMLType.Q8_0)
    torch.testing.assert_close(experts.dequantize(), torch.from_numpy(reference))
    torch.testing.assert_close(experts.select(1).dequantize(torch.bfloat16), torch.from_numpy(reference[1]).bfloat16())
    torch.testing.assert_close(model["blk.0.half"].dequantize(), torch.from_numpy(F16_VECTOR.astype(np.float32)))


def test_quant_tensor_rejects_a_wrong_byte_count():
    with pytest.raises(ValueError, match="needs 272 bytes"):
        QuantTensor("w", GGMLType.Q8_0, (2, 128), np.zeros(100, np.uint8))


def test_large_tokenizer_arrays(tmp_path):
    tokens = [f"tok{i}▁" for i in range(129_280)]
    merges = [f"a{i} b{i}" for i in range(127_000)]
    path = write_gguf(tmp_path / "vocab.gguf", metadata={
        "tokenizer.ggml.tokens": ("add_array", tokens),
        "tokenizer.ggml.merges": ("add_array", merges),
        "tokenizer.ggml.token_type": ("add_array", [1] * 129_280),
    })
    metadata = open_gguf(path).metadata
    assert metadata["tokenizer.ggml.tokens"] == tokens
    assert metadata["tokenizer.ggml.merges"] == merges
    assert metadata["tokenizer.ggml.token_type"] == [1] * 129_280


# --- split sets -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """A 3-part set written by the gguf package's own splitter (llama.cpp naming and split.* keys)."""
    directory = tmp_path_factory.mktemp("split")
    tensors = {f"t{i}": RNG.standard_normal((2, 32), dtype=np.float32) for i in range(6)}
    write_gguf(directory / "model.gguf", tensors, {"test.value": ("add_uint32", 7)}, split_max_tensors=2)
    return directory, tensors


def test_split_set_opens_from_directory_or_any_part(split_dir):
    directory, tensors = split_dir
    parts = sorted(directory.glob("*.gguf"))
    assert [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for source in (directory, parts[0], parts[1], parts[2]):
        model = open_gguf(source)
        assert model.files == parts
        assert model.metadata["test.value"] == 7 and model.architecture == "testarch"
        assert "split.count" not in model.metadata
        assert sorted(model.tensors) == sorted(tensors)
        for name, values in tensors.items():
            np.testing.assert_array_equal(model[name].data.view(np.float32).reshape(2, 32), values)
    owners = {name: next(p for p in model.parts if name in p.tensors).path.name for name in tensors}
    assert owners["t0"] == parts[0].name and owners["t5"] == parts[2].name


def test_missing_split_part_is_named(split_dir, tmp_path):
    directory, _ = split_dir
    for part in directory.glob("*.gguf"):
        shutil.copy(part, tmp_path / part.name)
    (tmp_path / "model-00002-of-00003.gguf").unlink()
    for source in (tmp_path, tmp_path / "model-00003-of-00003.gguf"):
        with pytest.raises(GGUFError, match="missing part.*model-00002-of-00003.gguf"):
            open_gguf(source)


def test_split_count_metadata_must_match_the_file_names(split_dir, tmp_path):
    directory, _ = split_dir
    for number in (1, 2, 3):
        shutil.copy(directory / f"model-0000{number}-of-00003.gguf", tmp_path / f"model-0000{number}-of-00004.gguf")
    write_gguf(tmp_path / "model-00004-of-00004.gguf", {"extra": F32_MATRIX})
    with pytest.raises(GGUFError, match=r"model-00001-of-00004.gguf: split.count is 3 but the set has 4"):
        open_gguf(tmp_path)


def test_duplicate_tensor_across_parts(tmp_path):
    for number in (0, 1):
        write_gguf(tmp_path / f"dup-0000{number + 1}-of-00002.gguf", {"shared": F32_MATRIX, f"own{number}": F32_MATRIX},
                   {"split.no": ("add_uint16", number), "split.count": ("add_uint16", 2)})
    with pytest.raises(GGUFError, match=r"dup-00002-of-00002.gguf: duplicate tensor 'shared': also in dup-00001"):
        open_gguf(tmp_path / "dup-00001-of-00002.gguf")


# --- broken files -----------------------------------------------------------------------------


def assert_file_unchanged_after_error(path, pattern):
    before = path.read_bytes()
    with pytest.raises(GGUFError, match=pattern) as caught:
        open_gguf(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before


def test_wrong_magic(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    assert_file_unchanged_after_error(path, "not a GGUF file: magic is b'GGML'")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_file_unchanged_after_error(path, "not a GGUF file: it is empty")


def test_unsupported_version(sample, tmp_path):
    path = tmp_path / "v9.gguf"
    data = bytearray(sample.read_bytes())
    data[4:8] = struct.pack("<I", 9)
    path.write_bytes(bytes(data))
    assert_file_unchanged_after_error(path, "unsupported GGUF version 9")


@pytest.mark.parametrize("keep", [6, 30, 200, 700])
def test_header_cut_short(sample, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    path.write_bytes(sample.read_bytes()[:keep])
    assert_file_unchanged_after_error(path, "truncated file")


def test_tensor_data_past_end_of_file(sample, tmp_path):
    path = tmp_path / "short.gguf"
    path.write_bytes(sample.read_bytes()[:-40])
    last = list(read_gguf_file(sample).tensors)[-1]
    assert_file_unchanged_after_error(path, f"truncated file: tensor '{last}' needs bytes")


def test_unknown_ggml_type_id(tmp_path):
    path = write_gguf(tmp_path / "weird.gguf", {"w": F32_MATRIX})
    data = bytearray(path.read_bytes())
    name_end = data.index(b"w\x02\x00\x00\x00") + 1  # name, then n_dims=2, two u64 dims, then the type
    type_at = name_end + 4 + 2 * 8
    assert struct.unpack_from("<I", data, type_at)[0] == GGMLType.F32
    data[type_at:type_at + 4] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    assert_file_unchanged_after_error(path, "tensor 'w' has unknown ggml type id 99")


def test_directory_problems(tmp_path):
    with pytest.raises(GGUFError, match="holds no .gguf file"):
        open_gguf(tmp_path)
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match=r"more than one model \(a.gguf, b.gguf\)"):
        open_gguf(tmp_path)
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "c.gguf")
    (tmp_path / "b.gguf").unlink()
    write_gguf(tmp_path / "a-00001-of-00001.gguf")
    with pytest.raises(GGUFError, match="more than one model"):
        open_gguf(tmp_path)  # a single file next to a split set of the same name


def test_package_exports_the_contract():
    import ktransformers.gguf as package
    from ktransformers.gguf.dequant import dequantize
    from ktransformers.gguf.random_blocks import random_quant_bytes

    assert package.dequantize is dequantize and package.random_quant_bytes is random_quant_bytes
    for name in package.__all__:
        assert getattr(package, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        package.nothing


def mapping_smaps(path) -> dict[str, int]:
    """Summed kB fields (Rss, Anonymous, ...) of this process's mappings of `path`, from /proc/self/smaps."""
    totals, inside = {}, False
    for line in open("/proc/self/smaps").read().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.endswith("kB"):
            totals[fields[0].rstrip(":")] = totals.get(fields[0].rstrip(":"), 0) + int(fields[1])
    return totals


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_populate_maps_every_page_without_private_copies(tmp_path):
    """populate() faults the whole file in (Rss = its size) read-only: the private, writable map keeps
    sharing the page cache (no anonymous copy-on-write pages), and the tensors read the same."""
    path = write_gguf(tmp_path / "big.gguf", {"w": RNG.standard_normal((256, 4096), dtype=np.float32)})
    model = open_gguf(path)
    before = mapping_smaps(path.resolve())
    if not model.populate():
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux 5.14+)")
    after = mapping_smaps(path.resolve())
    size_kb = path.stat().st_size // 1024
    assert before["Rss"] < size_kb // 2 <= size_kb - 8 <= after["Rss"]
    assert after["Anonymous"] == 0
    assert np.array_equal(model["w"].dequantize(torch.float32).numpy(), np.asarray(gguf.GGUFReader(path).tensors[0].data))
