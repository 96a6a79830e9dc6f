"""On the CPU the absorbed kv_b weights are laid out for the matrix-vector products of decode."""

import torch

from ktransformers.models.mla import AbsorbedKVB


def test_cpu_kv_b_keeps_values_and_makes_reduced_dimension_contiguous():
    w_uk, w_uv = torch.randn(4, 8, 16), torch.randn(4, 6, 16)
    fused = torch.cat([w_uk, w_uv], dim=1)  # the loader hands in slices of one per-head kv_b tensor
    kv_b = AbsorbedKVB(fused[:, :8], fused[:, 8:], "cpu", torch.float32)
    assert torch.equal(kv_b.w_uk, w_uk) and torch.equal(kv_b.w_uv, w_uv)
    assert kv_b.w_uk.transpose(1, 2).is_contiguous()  # storage [H, kv_lora, nope]: rows reduce over nope
    assert kv_b.w_uv.is_contiguous()  # [H, v, kv_lora]: rows reduce over kv_lora
    moved = kv_b.to(torch.bfloat16)
    assert moved.w_uk.transpose(1, 2).is_contiguous() and torch.equal(moved.w_uk, w_uk.to(torch.bfloat16))
