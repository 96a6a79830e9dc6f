"""The native row decoder behind the token embedding (kernels' dequantize_rows) against the gguf
package's numpy decoders (the oracle): exactly equal values for every type it decodes, rows gathered
by token id, bad ids refused; and QuantEmbedding gives the same rows through it as through torch."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ktransformers import kernels
from ktransformers.gguf import GGMLType, row_nbytes
from ktransformers.gguf.random_blocks import random_quant_bytes

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable on this CPU")

TYPES = [GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]


def test_the_decoded_types_are_the_ones_tested():
    assert sorted(kernels.row_decoder_types()) == sorted(int(t) for t in TYPES)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_rows_equal_the_gguf_decoder_exactly(ggml_type):
    rows, cols = 37, 512
    raw = random_quant_bytes(ggml_type, (rows, cols), np.random.default_rng(int(ggml_type)), scale=0.7)
    expected = torch.from_numpy(gguf_dequantize(raw.reshape(-1), GGMLQuantizationType(int(ggml_type))).reshape(rows, cols))
    ids = torch.tensor([5, 0, 36, 5, 17, 2, 9], dtype=torch.int64)
    out = torch.empty(len(ids), cols)
    kernels.require().dequantize_rows(raw.reshape(-1), int(ggml_type), rows, cols, row_nbytes(ggml_type, cols),
                                      ids.numpy(), out.numpy())
    assert torch.equal(out, expected[ids])  # bit for bit, pool path (7 rows) included
    one = torch.empty(1, cols)
    kernels.require().dequantize_rows(raw.reshape(-1), int(ggml_type), rows, cols, row_nbytes(ggml_type, cols),
                                      ids[2:3].numpy(), one.numpy())
    assert torch.equal(one[0], expected[36])


def test_bad_ids_and_shapes_are_refused():
    raw = random_quant_bytes(GGMLType.Q4_K, (4, 256), np.random.default_rng(0))
    mod, out = kernels.require(), torch.empty(1, 256)
    with pytest.raises(ValueError, match="row id 4"):
        mod.dequantize_rows(raw.reshape(-1), int(GGMLType.Q4_K), 4, 256, 144, np.array([4]), out.numpy())
    with pytest.raises(ValueError, match="row id -1"):
        mod.dequantize_rows(raw.reshape(-1), int(GGMLType.Q4_K), 4, 256, 144, np.array([-1]), out.numpy())
    with pytest.raises(ValueError, match="rows of 143 bytes"):
        mod.dequantize_rows(raw.reshape(-1), int(GGMLType.Q4_K), 4, 256, 143, np.array([0]), out.numpy())
    with pytest.raises(ValueError, match="no native decoder"):
        mod.dequantize_rows(raw.reshape(-1), int(GGMLType.IQ2_XXS), 4, 256, 144, np.array([0]), out.numpy())


def test_quant_embedding_gives_the_torch_decoders_rows(tiny_model):
    from ktransformers.models.loader import load_model

    for mix in ("q4_k_m", "q8_0"):
        embed = load_model(tiny_model(quant_mix=mix), device="cpu", max_context=16).model.model.embed_tokens
        assert embed._native is not None, mix
        ids = torch.tensor([[3, 1, 3, 7]])
        native = embed(ids)
        embed._native = None  # the torch decoders
        assert torch.equal(native, embed(ids)), mix
        with pytest.raises(ValueError, match="out of range"):
            embed(torch.tensor([embed.num_embeddings]))


def test_every_half_precision_scale_decodes_like_numpy():
    """Q8_0 rows whose scale d runs through all 65536 float16 bit patterns (subnormals, infinities, NaNs)."""
    blocks = np.zeros((65536, 34), dtype=np.uint8)
    blocks[:, :2] = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    with np.errstate(invalid="ignore"):  # inf * 0 in the NaN/infinity rows
        expected = torch.from_numpy(gguf_dequantize(blocks.reshape(-1), GGMLQuantizationType.Q8_0).reshape(65536, 32))
    out = torch.empty(65536, 32)
    kernels.require().dequantize_rows(blocks.reshape(-1), int(GGMLType.Q8_0), 65536, 32, 34,
                                      np.arange(65536, dtype=np.int64), out.numpy())
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
