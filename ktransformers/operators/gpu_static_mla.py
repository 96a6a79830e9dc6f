"""One-token MLA decode with static shapes, so a CUDA graph can capture it.

`MLAttention.forward` slices its cache with the Python int `start_pos`, which a captured graph
would freeze. Here the position is a device tensor: the new cache row is written with
`index_copy_` and the query attends over the whole static cache, rows after the position masked
out. Same math as `MLAttention.forward` for T = 1 (see models/mla.py for the absorbed form).
"""

import torch

from ktransformers.models.layers import run


def decode_attention(attn, x: torch.Tensor, position: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """x [1, hidden] at `position` (int64 [1] on attn.device) -> [1, hidden]; writes that cache row.

    key_index: int64 [max_context] = arange(max_context) on attn.device (kept static by the caller).
    """
    # the whole rotation table stays put; the row of `position` is gathered on the device
    rotation = attn.rope.rotations(0, attn.kv_cache.shape[0], attn.device).index_select(0, position)
    q_nope, q_rope = attn._query(x).split([attn.nope_dim, attn.rope_dim], dim=-1)
    q_rope = attn.rope.apply(q_rope, rotation)
    compressed = run(attn.kv_a_proj_with_mqa, x).to(attn.device, attn.dtype)
    latent, k_rope = compressed.split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    row = torch.cat([run(attn.kv_a_layernorm, latent).to(attn.device, attn.dtype),
                     attn.rope.apply(k_rope, rotation)], dim=-1)
    attn.kv_cache.index_copy_(0, position, row)

    q_latent = torch.bmm(q_nope.transpose(0, 1), attn.kv_b_proj.w_uk)  # [H, 1, kv_lora]
    query = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1).reshape(attn.n_heads, -1)
    keys = attn.kv_cache
    scores = (query @ keys.T).float() * attn.scale  # [H, max_context]
    scores.masked_fill_(key_index[None, :] > position, float("-inf"))
    out_latent = scores.softmax(dim=-1).to(keys.dtype) @ keys[:, :attn.kv_lora_rank]
    out = torch.bmm(out_latent.view(attn.n_heads, 1, -1), attn.kv_b_proj.w_uv.transpose(1, 2))
    return run(attn.o_proj, out.transpose(0, 1).reshape(1, attn.n_heads * attn.v_dim))
