"""ktransformers.gguf.dequant and random_blocks against the gguf package's numpy decoders (the oracle)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktransformers.gguf.dequant import SUPPORTED_TYPES, dequantize, dequantize_rows
from ktransformers.gguf.ggml_types import block_info
from ktransformers.gguf.random_blocks import random_quant_bytes, scale_fields, write_scale

# Every ggml type the DeepSeek GGUFs (and their float tensors) use.
REQUIRED = (
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K "
    "IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS"
).split()
TYPES = [GGMLQuantizationType[name] for name in REQUIRED]


# Torch-order shapes of at most a few hundred blocks: 1-D, odd row counts, an expert-like stack.
# Every row is a multiple of 256 elements (one k-quant block, eight 32-element blocks).
SHAPES = [(256,), (1, 256), (3, 512), (7, 1024), (3, 5, 1024)]


def oracle(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """gguf's numpy decoder on the bytes reshaped to rows, as float32 in `shape`."""
    rows = raw.reshape(-1, raw.size // int(np.prod(shape[:-1])))
    with np.errstate(all="ignore"):
        return np.asarray(gguf_dequantize(rows, qtype), dtype=np.float32).reshape(shape)


def random_bytes_with_finite_scales(qtype, shape, rng) -> np.ndarray:
    """Fully random block bytes; only the fp16 fields are replaced, with finite values (NaN payloads
    are not part of the format's contract and numpy/torch quiet them differently)."""
    block, nbytes = block_info(qtype)
    n_blocks = int(np.prod(shape)) // block
    if block == 1:  # plain floats: random finite values spanning many exponents
        values = rng.standard_normal(n_blocks) * np.exp2(rng.integers(-20, 20, n_blocks))
        as_torch = torch.from_numpy(values.astype(np.float32))
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype.name]
        return as_torch.to(dtype).view(torch.uint8).numpy()
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for name in scale_fields(qtype):
        # wide range of magnitudes, including fp16 subnormals, zero and negative values
        write_scale(blocks, qtype, name, rng.standard_normal(n_blocks) * np.exp2(rng.integers(-20, 8, n_blocks)))
    return blocks.reshape(-1)


def test_every_required_type_is_supported():
    assert set(TYPES) <= set(SUPPORTED_TYPES)


# Both sides decode the same fp16 scales and do the same float32 operations in the same order, so
# the results must agree bit for bit (torch.equal); no tolerance is needed.
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_gguf_on_random_bytes(qtype):
    rng = np.random.default_rng(qtype.value)
    for shape in SHAPES:
        raw = random_bytes_with_finite_scales(qtype, shape, rng)
        ours = dequantize(raw, qtype, shape)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
        assert torch.equal(ours, torch.from_numpy(oracle(raw, qtype, shape))), (qtype.name, shape)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_gguf_on_random_quant_bytes(qtype):
    rng = np.random.default_rng(1000 + qtype.value)
    for shape in SHAPES[2:]:
        raw = random_quant_bytes(qtype, shape, rng, scale=0.02)
        assert raw.dtype == np.uint8 and raw.ndim == 1
        assert torch.equal(dequantize(raw, qtype, shape), torch.from_numpy(oracle(raw, qtype, shape)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.02, 0.001])
def test_random_quant_bytes_spread(qtype, scale):
    rng = np.random.default_rng(7)
    shape = (4, 512)
    values = torch.from_numpy(oracle(random_quant_bytes(qtype, shape, rng, scale=scale), qtype, shape))
    assert torch.isfinite(values).all()
    assert scale / 2 < values.std().item() < scale * 2
    assert abs(values.mean().item()) < scale  # roughly centred, like real weights


def test_random_quant_bytes_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Q4_K: shape \\(2, 100\\) needs a last dimension that is a multiple of 256"):
        random_quant_bytes("Q4_K", (2, 100), np.random.default_rng(0))
    with pytest.raises(ValueError, match="TQ2_0 is not supported"):
        random_quant_bytes("TQ2_0", (256,), np.random.default_rng(0))
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        random_quant_bytes("Q8_0", (1, 32), np.random.default_rng(0), scale=1e7)


def test_random_quant_bytes_is_reproducible_and_random():
    a = random_quant_bytes("Q4_K", (2, 256), np.random.default_rng(3))
    b = random_quant_bytes("Q4_K", (2, 256), np.random.default_rng(3))
    c = random_quant_bytes("Q4_K", (2, 256), np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_raw_input_kinds_agree():
    rng = np.random.default_rng(11)
    shape = (3, 512)
    raw = random_quant_bytes("Q6_K", shape, rng)
    expected = torch.from_numpy(oracle(raw, GGMLQuantizationType.Q6_K, shape))
    kinds = {
        "numpy": raw,
        "numpy 2-D": raw.reshape(3, -1),
        "read-only numpy": np.frombuffer(raw.tobytes(), dtype=np.uint8),
        "torch": torch.from_numpy(raw.copy()),
        "bytes": raw.tobytes(),
        "bytearray": bytearray(raw.tobytes()),
        "memoryview": memoryview(raw.tobytes()),
        "unaligned numpy slice": np.concatenate([[0], raw]).astype(np.uint8)[1:],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only buffers must not leak torch's non-writable warning
        for kind, value in kinds.items():
            assert torch.equal(dequantize(value, "Q6_K", shape), expected), kind


@pytest.mark.parametrize("type_spec", [GGMLQuantizationType.Q4_K, "Q4_K", "q4_k", 12])
def test_type_spellings(type_spec):
    raw = random_quant_bytes("Q4_K", (1, 256), np.random.default_rng(0))
    assert torch.equal(dequantize(raw, type_spec, (1, 256)), dequantize(raw, "Q4_K", (256,)).view(1, 256))


def test_dequantize_rows_into_buffer_and_dtype():
    rng = np.random.default_rng(5)
    raw = random_quant_bytes("IQ2_XXS", (7, 256), rng)
    expected = torch.from_numpy(oracle(raw, GGMLQuantizationType.IQ2_XXS, (7, 256)))
    out = torch.full((7, 256), float("nan"))
    assert dequantize_rows(raw, "IQ2_XXS", 7, 256, out=out) is out
    assert torch.equal(out, expected)
    half = dequantize_rows(raw, "IQ2_XXS", 7, 256, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected.to(torch.bfloat16))


def test_chunked_decoding_matches_one_shot(monkeypatch):
    import ktransformers.gguf.dequant as dequant_module

    raw = random_quant_bytes("Q3_K", (5, 768), np.random.default_rng(9))
    whole = dequantize(raw, "Q3_K", (5, 768))
    monkeypatch.setattr(dequant_module, "CHUNK_ELEMENTS", 512)  # 2 blocks per step, ragged last step
    assert torch.equal(dequantize(raw, "Q3_K", (5, 768)), whole)


def test_empty_tensor():
    assert dequantize(b"", "Q4_K", (0, 256)).shape == (0, 256)


def test_bad_byte_count_is_reported():
    raw = random_quant_bytes("Q4_K", (2, 256), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"Q4_K tensor of 2x256 needs 288 bytes .* got 287"):
        dequantize(raw[:-1], "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="needs 432 bytes"):
        dequantize(raw, "Q4_K", (3, 256))


def test_row_not_multiple_of_block_is_reported():
    with pytest.raises(ValueError, match="Q8_0: row length 48 is not a multiple of the block size 32"):
        dequantize(bytes(68), "Q8_0", (1, 48))


def test_unknown_and_unsupported_types_are_reported():
    with pytest.raises(ValueError, match="unknown ggml type name 'Q9_K'"):
        dequantize(bytes(16), "Q9_K", (4,))
    with pytest.raises(ValueError, match="unknown ggml type id 1234"):
        dequantize(bytes(16), 1234, (4,))
    with pytest.raises(ValueError, match="TQ1_0 is not supported"):
        dequantize(bytes(54), "TQ1_0", (256,))


def test_bad_raw_kinds_are_reported():
    with pytest.raises(TypeError, match="must be uint8"):
        dequantize(torch.zeros(4, dtype=torch.float32), "F32", (4,))
    with pytest.raises(TypeError, match="must be uint8"):
        dequantize(np.zeros(4, dtype=np.float32), "F32", (4,))
    with pytest.raises(TypeError, match="got list"):
        dequantize([0, 0, 0, 0], "F32", (1,))
    with pytest.raises(ValueError, match="at least one dimension"):
        dequantize(bytes(4), "F32", ())


def test_bad_out_buffer_is_reported():
    raw = bytes(18)
    with pytest.raises(ValueError, match="out must be a contiguous float tensor of 1x32 elements on cpu"):
        dequantize_rows(raw, "Q4_0", 1, 32, out=torch.empty(1, 16))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_rows(raw, "Q4_0", 1, 32, out=torch.empty(32, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cuda_decoding_matches_cpu(qtype):
    rng = np.random.default_rng(2000 + qtype.value)
    shape = SHAPES[-1]
    raw = random_bytes_with_finite_scales(qtype, shape, rng)
    on_gpu = dequantize(torch.from_numpy(raw).cuda(), qtype, shape)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), dequantize(raw, qtype, shape))


MEMORY_PROBE = """
import resource, sys
import numpy as np, torch
from ktransformers.gguf.dequant import dequantize
from ktransformers.gguf.random_blocks import write_scale
blocks = np.random.default_rng(0).integers(0, 256, size=(2048 * 7168 // 256, 144), dtype=np.uint8)
write_scale(blocks, "Q4_K", "d", 1e-3)
write_scale(blocks, "Q4_K", "dmin", 1e-3)
dequantize(blocks[:8].reshape(-1), "Q4_K", (8, 256))  # warm up tables and allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = dequantize(blocks.reshape(-1), "Q4_K", (2048, 7168))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, out.numel() * 4)
"""


def test_large_tensor_memory_stays_near_output_size():
    # a fresh process, so that the peak-RSS reading sees only this decode
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, output_bytes = map(int, done.stdout.split())
    assert grown < 1.5 * output_bytes, f"peak memory grew {grown / 1e6:.0f} MB for a {output_bytes / 1e6:.0f} MB output"
