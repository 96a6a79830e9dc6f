"""Multi-head Latent Attention (DeepSeek V2/V3) over a compressed KV cache, with absorbed weights.

Per layer and token the cache holds only the normalized KV latent (kv_lora_rank values) and the
rotated shared rope key (qk_rope_head_dim values); full per-head keys/values are never built.
Scores use q_nope absorbed through W_UK (q_nope @ W_UK lands in latent space) plus the rope part,
and the latent-space output is mapped to values through W_UV:

    score[h, t, s] = (q_nope[t, h] W_UK[h]) . latent[s] + q_rope[t, h] . k_rope[s]
    out[t, h]      = W_UV[h] (sum_s softmax(score)[h, t, s] latent[s])
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekConfig, softmax_scale
from .layers import run
from .rope import RotaryEmbedding

# Score-matrix elements per attention call; longer prefill chunks are split into query blocks.
MAX_SCORE_ELEMENTS = 1 << 26


class AbsorbedKVB(nn.Module):
    """kv_b_proj split per head: W_UK [H, nope, kv_lora] (keys) and W_UV [H, v, kv_lora] (values)."""

    def __init__(self, w_uk: torch.Tensor, w_uv: torch.Tensor, device, dtype):
        super().__init__()
        self.register_buffer("w_uk", w_uk.to(device=device, dtype=dtype))
        self.register_buffer("w_uv", w_uv.to(device=device, dtype=dtype))

    def extra_repr(self):
        return f"w_uk={tuple(self.w_uk.shape)}, w_uv={tuple(self.w_uv.shape)}, dtype={self.w_uk.dtype}"


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekConfig, factory, prefix: str, max_context: int):
        super().__init__()
        place = factory.placement(prefix)
        self.device, self.dtype = place.device, place.dtype
        self.n_heads, self.kv_lora_rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = softmax_scale(cfg)
        self.max_context = max_context

        if cfg.q_lora_rank:
            self.q_a_proj = factory.linear(f"{prefix}.q_a_proj")
            self.q_a_layernorm = factory.norm(f"{prefix}.q_a_layernorm")
            self.q_b_proj = factory.linear(f"{prefix}.q_b_proj")
        else:
            self.q_proj = factory.linear(f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = factory.linear(f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = factory.norm(f"{prefix}.kv_a_layernorm")
        self.kv_b_proj = factory.kv_b(f"{prefix}.kv_b_proj")
        self.o_proj = factory.linear(f"{prefix}.o_proj")
        self.rotary_emb = RotaryEmbedding(cfg, self.device)
        # compressed cache, one row per position: [normalized latent | rotated rope key]
        self.register_buffer("kv_cache", torch.zeros(max_context, self.kv_lora_rank + self.rope_dim,
                                                     device=self.device, dtype=self.dtype), persistent=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = run(self.q_proj, x)
        else:
            q = run(self.q_b_proj, run(self.q_a_layernorm, run(self.q_a_proj, x)))
        return q.to(self.device, self.dtype).view(x.shape[0], self.n_heads, self.nope_dim + self.rope_dim)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x [T, hidden] for positions start_pos..start_pos+T-1 -> [T, hidden]; writes those cache rows."""
        n_tokens = x.shape[0]
        end = start_pos + n_tokens
        positions = torch.arange(start_pos, end, device=self.device)
        cos, sin = self.rotary_emb.cos_sin(positions)

        q_nope, q_rope = self._query(x).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rotary_emb(q_rope, cos, sin)
        compressed = run(self.kv_a_proj_with_mqa, x).to(self.device, self.dtype)
        latent, k_rope = compressed.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        self.kv_cache[start_pos:end, :self.kv_lora_rank] = run(self.kv_a_layernorm, latent).to(self.device,
                                                                                                 self.dtype)
        self.kv_cache[start_pos:end, self.kv_lora_rank:] = self.rotary_emb(k_rope, cos, sin)

        # all heads share one latent key/value, so attend as a single head over T*H query rows
        q_latent = torch.einsum("thn,hnc->thc", q_nope, self.kv_b_proj.w_uk)
        query = torch.cat([q_latent, q_rope], dim=-1).reshape(n_tokens * self.n_heads, -1)
        keys = self.kv_cache[:end]
        out_latent = self._attend(query, keys, keys[:, :self.kv_lora_rank], positions)
        out = torch.einsum("thc,hvc->thv", out_latent.view(n_tokens, self.n_heads, -1), self.kv_b_proj.w_uv)
        return run(self.o_proj, out.reshape(n_tokens, self.n_heads * self.v_dim))

    def _attend(self, query, keys, values, positions):
        """Causal softmax attention of query rows ordered (token, head) over cache rows 0..end-1."""
        rows_per_block = max(self.n_heads, MAX_SCORE_ELEMENTS // keys.shape[0] // self.n_heads * self.n_heads)
        outputs = []
        for first in range(0, query.shape[0], rows_per_block):
            block = query[first:first + rows_per_block]
            row_pos = positions.repeat_interleave(self.n_heads)[first:first + rows_per_block]
            mask = None
            if int(row_pos.min()) < keys.shape[0] - 1:  # some row must not see the newest keys
                mask = torch.arange(keys.shape[0], device=self.device)[None, :] <= row_pos[:, None]
            outputs.append(F.scaled_dot_product_attention(block[None, None], keys[None, None], values[None, None],
                                                          attn_mask=mask, scale=self.scale)[0, 0])
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
