"""Multi-head Latent Attention (DeepSeek V2/V3) over a compressed KV cache, with absorbed weights.

Per layer and token the cache holds only the normalized KV latent (kv_lora_rank values) and the
rotated shared rope key (qk_rope_head_dim values); full per-head keys/values are never built.
Scores use q_nope absorbed through W_UK (q_nope @ W_UK lands in latent space) plus the rope part,
and the latent-space output is mapped to values through W_UV:

    score[h, t, s] = (q_nope[t, h] W_UK[h]) . latent[s] + q_rope[t, h] . k_rope[s]
    out[t, h]      = W_UV[h] (sum_s softmax(score)[h, t, s] latent[s])

Long prefill chunks on a GPU take the other form instead: the cache rows are expanded into per-head
keys [latent W_UK[h]^T | k_rope] and values latent W_UV[h]^T, and torch's fused attention
(scaled_dot_product_attention) runs per head. Scoring then costs nope + rope + v = 320
multiply-adds per head, query and key instead of 2 * kv_lora + rope = 1088, which pays for the
expansion once a chunk has a few hundred tokens, and no score matrix is materialized.
"""

import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ktransformers import kernels
from ktransformers.operators.cpu_quant import LinearGroup

from .absorbed_kv_b import AbsorbedKVB, NativeAbsorbedKVB
from .config import DeepseekConfig, softmax_scale
from .layers import run
from .rope import RopeTable

# Score-matrix elements per attention call; longer prefill chunks are split into query blocks.
MAX_SCORE_ELEMENTS = 1 << 26
# CPU prefill: a first chunk of at least this many tokens attends on the kernel pool, scoring each
# token's causal prefix only (half of torch's multiply-adds, at 256-bit vectors' speed): 512 tokens
# took 82 ms against torch's 123 on 16 Sapphire Rapids cores (527 against 1063 on 2 Zen 4 cores).
# Shorter chunks, and chunks after earlier rows, are faster in torch's matmuls there (128 tokens:
# 6.3 against 4.5 ms; 512 after 512: 250 against 208): benchmarks/mla_prefill.py --cpu.
NATIVE_PREFILL_MIN_TOKENS = 512
# ... unless the kernel pool wins there too, as on AMD Zen 4 (2 cores, 128 tokens: 27 against 62 ms;
# 512 after 512: 937 against 1516): native_prefill_everywhere() times both forms once.
NATIVE_PREFILL_ENV = "KT_NATIVE_PREFILL_ATTENTION"
_native_prefill_everywhere: bool | None = None
# GPU prefill chunks of at least this many tokens use the expanded form (module docstring): the
# expansion costs H * kv_lora * (nope + v) multiply-adds per key, which the cheaper scoring repays
# from ~350 query tokens on
EXPANDED_MIN_TOKENS = 512
# ... while the context's expanded keys and values fit in this many bytes (80 KB a row at 128 heads
# and bfloat16: 13K rows); past that the absorbed form, whose temporaries do not grow with the context
EXPANDED_MAX_BYTES = 1 << 30


def native_prefill_everywhere() -> bool:
    """Whether every CPU prefill chunk attends on the kernel pool, not only long first chunks: set by
    KT_NATIVE_PREFILL_ATTENTION=1 or 0, else by timing both forms once per process on a chunk after
    earlier rows (the case torch's matmuls won by 2x on Sapphire Rapids, and lost on Zen 4)."""
    global _native_prefill_everywhere
    if _native_prefill_everywhere is None:
        forced = os.environ.get(NATIVE_PREFILL_ENV, "").strip()
        if forced not in ("", "0", "1"):
            raise ValueError(f"{NATIVE_PREFILL_ENV} must be 0 or 1, got {forced!r}")
        _native_prefill_everywhere = forced == "1" if forced else _kernel_pool_attends_faster()
    return _native_prefill_everywhere


def _kernel_pool_attends_faster(heads: int = 32, tokens: int = 64, context: int = 448) -> bool:
    """Best of 3 of each form at DeepSeek's 576-wide rows (a few ms on a workstation)."""
    width, value_dim, scale = 576, 512, 0.1
    gen = torch.Generator().manual_seed(0)
    query, keys = torch.randn(heads * tokens, width, generator=gen), torch.randn(context + tokens, width, generator=gen)

    def best(call):
        call()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    native = best(lambda: kernels.mla_prefill_attention(query, keys, tokens, value_dim, scale))
    matmuls = best(lambda: masked_attention(query, keys, keys[:, :value_dim], context, tokens, scale))
    return native < matmuls


def masked_attention(query, keys, values, start_pos: int, n_tokens: int, scale: float) -> torch.Tensor:
    """Causal softmax attention by torch's matmuls: query rows head-major (row = h * T + t) for positions
    start_pos.., every key scored, later ones masked; in query blocks of MAX_SCORE_ELEMENTS scores."""
    n_keys = keys.shape[0]
    rows_per_block = max(1, MAX_SCORE_ELEMENTS // n_keys)
    outputs = []
    for first in range(0, query.shape[0], rows_per_block):
        block = query[first:first + rows_per_block]
        scores = (block @ keys.T).float() * scale
        if n_tokens > 1:  # a prefill chunk: token t must not see the chunk's later keys
            rows = torch.arange(first, first + block.shape[0], device=keys.device)
            row_pos = start_pos + rows % n_tokens
            hidden = torch.arange(n_keys, device=keys.device)[None, :] > row_pos[:, None]
            scores.masked_fill_(hidden, float("-inf"))
        outputs.append(scores.softmax(dim=-1).to(values.dtype) @ values)
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def native_attention(cache: torch.Tensor) -> bool:
    """Attention over a float32 CPU cache runs on the native kernel pool for decode steps (torch's matmuls
    there would wake torch's OpenMP threads, which contend with the pool that just ran the linears) and
    long first prefill chunks (NATIVE_PREFILL_MIN_TOKENS), or every prefill chunk where the kernel pool
    is the faster (native_prefill_everywhere)."""
    return cache.device.type == "cpu" and cache.dtype == torch.float32 and kernels.available()


class MLAttention(nn.Module):
    """forward(x, start_pos, slot) for one sequence's prefill chunks and eager steps; forward_rows(x,
    positions, slots) for one token of each of several sequences (a batched CPU step); decode_static(x,
    position, slots) for the same with positions and slots in device tensors (util/cuda_graph.StaticDecoder
    captures it as a CUDA graph). Each sequence has its own cache slot in `kv_slots`.
    """

    def __init__(self, cfg: DeepseekConfig, factory, prefix: str, max_context: int, rope: RopeTable,
                 n_slots: int = 1):
        super().__init__()
        self.placement = place = factory.placement(prefix)  # of the attention maths and the cache
        self.device, self.dtype = place.device, place.dtype
        self.n_heads, self.kv_lora_rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = softmax_scale(cfg)

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
        self.rope = rope  # shared by all layers: a plain attribute, not a submodule
        norm = self.kv_a_layernorm.weight
        self._native_project = (isinstance(self.kv_b_proj, NativeAbsorbedKVB) and self.dtype == torch.float32
                                and norm.dtype == torch.float32 and norm.device.type == "cpu")
        # decode: q_a and kv_a read the same row, in one native call
        self._q_a_and_kv_a = LinearGroup.of(self.q_a_proj, self.kv_a_proj_with_mqa) \
            if self._native_project and cfg.q_lora_rank else None
        # compressed cache, one table per sequence slot and one row per position:
        # [normalized latent | rotated rope key]
        self.register_buffer("kv_slots", torch.zeros(n_slots, max_context, self.kv_lora_rank + self.rope_dim,
                                                     device=self.device, dtype=self.dtype), persistent=False)
        self.register_buffer("key_index", torch.arange(max_context, device=self.device), persistent=False)
        # chunks this long take the expanded form (None: never); the CPU keeps the absorbed one, whose
        # native products give prefill and decode the same bits
        self.expanded_min_tokens = EXPANDED_MIN_TOKENS if self.device.type == "cuda" else None

    @property
    def kv_cache(self) -> torch.Tensor:
        """Slot 0's cache [max_context, width]: the one sequence of single-sequence callers."""
        return self.kv_slots[0]

    def _query(self, x: torch.Tensor, q_a: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H * (nope + rope)]; q_a: q_a_proj's output for x when it was already computed."""
        if hasattr(self, "q_proj"):
            q = run(self.q_proj, x)
        else:
            q = run(self.q_b_proj, run(self.q_a_layernorm, run(self.q_a_proj, x) if q_a is None else q_a))
        return q.to(self.device, self.dtype)

    def _compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized latent [T, kv_lora], rope key before rotation [T, rope_dim])."""
        compressed = run(self.kv_a_proj_with_mqa, x).to(self.device, self.dtype)
        latent, k_rope = compressed.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return run(self.kv_a_layernorm, latent).to(self.device, self.dtype), k_rope

    def _absorbed_query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Query rows [H*T, kv_lora + rope_dim], head-major (row = h * T + t).

        All heads share one latent key/value, so attention runs as a single head over H*T rows;
        head-major order lets the per-head matmuls use the weights without transposed copies.
        """
        q_latent = self.kv_b_proj.absorb_query(q_nope)  # [H, T, kv_lora]
        rows = torch.cat([q_latent.to(self.dtype), q_rope.transpose(0, 1)], dim=-1)
        return rows.reshape(-1, self.kv_lora_rank + self.rope_dim)

    def _output(self, out_latent: torch.Tensor, n_tokens: int) -> torch.Tensor:
        out = self.kv_b_proj.expand_values(out_latent.view(self.n_heads, n_tokens, -1))  # [T, H, v]
        return run(self.o_proj, out.reshape(n_tokens, self.n_heads * self.v_dim).to(self.dtype))

    def _heads(self, x: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_nope [T, H, nope], rotated q_rope [T, H, rope], new cache rows [T, kv_lora + rope_dim])."""
        q_nope, q_rope = self._query(x).view(x.shape[0], self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self._compress(x)
        rows = torch.cat([latent, self.rope.apply(k_rope, rotations)], dim=-1)
        return q_nope, self.rope.apply(q_rope, rotations), rows

    def _project(self, x: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(absorbed query rows, new cache rows [T, kv_lora + rope_dim]) for x at the rotations' positions."""
        if self._native_project:  # the CPU rules: the same steps in two native calls instead of ~20 torch ops
            kv = run(self.kv_a_proj_with_mqa, x).to(self.device, self.dtype)
            q_nope, query, rows = kernels.mla_prepare(self._query(x), kv, self.kv_a_layernorm.weight,
                                                      self.kv_a_layernorm.eps, rotations, self.rope.interleaved,
                                                      self.n_heads, self.nope_dim, self.rope_dim)
            self.kv_b_proj.w_uk(q_nope, out=query)  # the absorbed query fills the latent columns
            return query.view(-1, self.kv_lora_rank + self.rope_dim), rows
        q_nope, q_rope, rows = self._heads(x, rotations)
        return self._absorbed_query(q_nope, q_rope), rows

    def forward(self, x: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        """x [T, hidden] for positions start_pos..start_pos+T-1 of one sequence -> [T, hidden]; writes those
        rows of the sequence's cache slot."""
        n_tokens = x.shape[0]
        end = start_pos + n_tokens
        cache = self.kv_slots[slot]
        if n_tokens == 1 and self._native_project and native_attention(cache):
            return self._native_step(x, start_pos, cache)
        if self._expands(n_tokens, end):
            q_nope, q_rope, rows = self._heads(x, self.rope.rotations(start_pos, end, self.device))
            cache[start_pos:end] = rows
            return run(self.o_proj, self._expanded_attention(q_nope, q_rope, cache[:end]))
        query, rows = self._project(x, self.rope.rotations(start_pos, end, self.device))
        cache[start_pos:end] = rows
        keys = cache[:end]
        return self._output(self._attend(query, keys, keys[:, :self.kv_lora_rank], start_pos, n_tokens), n_tokens)

    def _expands(self, n_tokens: int, n_keys: int) -> bool:
        """Whether a chunk of n_tokens over n_keys cache rows takes the expanded form."""
        if self.expanded_min_tokens is None or n_tokens < self.expanded_min_tokens \
                or not isinstance(self.kv_b_proj, AbsorbedKVB):
            return False
        row_bytes = self.n_heads * (self.nope_dim + self.rope_dim + self.v_dim) * self.kv_slots.element_size()
        return n_keys * row_bytes <= EXPANDED_MAX_BYTES

    def _expanded_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Causal attention of the chunk's T queries (the last T of the cache rows `keys` [S, width]) with
        per-head keys and values expanded from the latent rows -> o_proj's input [T, H * v]."""
        n_tokens, n_keys = q_nope.shape[0], keys.shape[0]
        latent, k_rope = keys.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, values = self.kv_b_proj.expand_keys_values(latent)  # [S, H, nope], [S, H, v]
        head_keys = torch.cat([k_nope.to(self.dtype), k_rope[:, None].expand(n_keys, self.n_heads, self.rope_dim)], -1)
        query = torch.cat([q_nope, q_rope], dim=-1).to(self.dtype)
        # [1, H, rows, dim] views; the mask aligns the chunk's queries with the last keys
        out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], head_keys.transpose(0, 1)[None],
                                             values.to(self.dtype).transpose(0, 1)[None],
                                             attn_mask=causal_lower_right(n_tokens, n_keys), scale=self.scale)
        return out[0].transpose(0, 1).reshape(n_tokens, self.n_heads * self.v_dim)

    def _native_step(self, x: torch.Tensor, position: int, cache: torch.Tensor) -> torch.Tensor:
        """One token on the CPU rules: the linears, then everything between them in one native call."""
        if self._q_a_and_kv_a is not None:
            q_a, kv = self._q_a_and_kv_a(x)
        else:
            q_a, kv = None, run(self.kv_a_proj_with_mqa, x).to(self.device, self.dtype).contiguous()
        q = self._query(x, q_a).contiguous()
        out = self.kv_b_proj.decode_step(q, kv, self.kv_a_layernorm, self.rope.cpu_pairs(), self.rope.interleaved,
                                         cache, position, self.scale)
        return run(self.o_proj, out)

    def forward_rows(self, x: torch.Tensor, positions: list[int], slots: list[int]) -> torch.Tensor:
        """One new token of each of several sequences: row b of x [B, hidden] sits at positions[b] of
        cache slot slots[b] -> [B, hidden]. The projections run on all rows at once; each row attends
        to its own sequence's live rows only."""
        n = x.shape[0]
        rotations = self.rope.table(self.device).index_select(0, torch.tensor(positions, device=self.device))
        query, rows = self._project(x, rotations)
        query = query.view(self.n_heads, n, -1)
        outputs = []
        for b, (position, slot) in enumerate(zip(positions, slots)):
            cache = self.kv_slots[slot]
            cache[position] = rows[b]
            keys = cache[:position + 1]
            outputs.append(self._attend(query[:, b], keys, keys[:, :self.kv_lora_rank], position, 1))
        return self._output(torch.stack(outputs, dim=1).reshape(self.n_heads * n, -1), n)

    def decode_static(self, x: torch.Tensor, position: torch.Tensor, slots: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
        """Row b of x [B, hidden] at position[b] of cache slot slots[b] (int64 [B] tensors on self.device;
        slots None: slot 0) -> [B, hidden]; writes those cache rows.

        Nothing depends on the values on the host, so a CUDA graph can capture it: the rows are written
        with index_put_, and each query scores the first `window` rows of its slot (default: all
        max_context), the ones past its position masked; every position must be below `window`.
        StaticDecoder captures one graph per window size, so a step reads the cache rows its context
        needs rather than the whole window (at 32K tokens ~38 MB a layer).
        On the CPU, where reading the positions costs nothing, this is `forward_rows`: only the live rows
        are scored (scoring all 4224 rows of the benchmark's window cost ~3 ms a layer on 16 cores).
        """
        if slots is None:
            slots = torch.zeros_like(position)
        if self.device.type == "cpu":
            return self.forward_rows(x, position.tolist(), slots.tolist())
        return self.decode_masked(x, position, slots, window)

    def decode_masked(self, x: torch.Tensor, position: torch.Tensor, slots: torch.Tensor,
                      window: int | None = None) -> torch.Tensor:
        """decode_static's capturable form on any device (the CPU runs it only in tests)."""
        max_context = self.kv_slots.shape[1]
        window = max_context if window is None else window
        if not 0 < window <= max_context:
            raise ValueError(f"window {window} outside 1..{max_context}")
        n = x.shape[0]
        query, rows = self._project(x, self.rope.table(self.device).index_select(0, position))
        self.kv_slots.index_put_((slots, position), rows)
        # each row's own slot: a gathered copy of its window (B x window rows)
        keys = self.kv_slots[:, :window].index_select(0, slots)
        scores = torch.bmm(query.view(self.n_heads, n, -1).transpose(0, 1), keys.transpose(1, 2)).float() * self.scale
        scores.masked_fill_(self.key_index[None, None, :window] > position[:, None, None], float("-inf"))
        out = torch.bmm(scores.softmax(dim=-1).to(self.dtype), keys[..., :self.kv_lora_rank])  # [B, H, kv_lora]
        return self._output(out.transpose(0, 1).reshape(self.n_heads * n, -1), n)

    def _attend(self, query, keys, values, start_pos: int, n_tokens: int):
        """Causal softmax attention of query rows (head-major: row = h * T + t) over cache rows 0..end-1."""
        if native_attention(keys):  # the CPU rules: on the kernel pool
            if n_tokens == 1:
                return kernels.mla_decode_attention(query, keys, self.kv_lora_rank, self.scale)
            if (start_pos == 0 and n_tokens >= NATIVE_PREFILL_MIN_TOKENS) or native_prefill_everywhere():
                return kernels.mla_prefill_attention(query, keys, n_tokens, self.kv_lora_rank, self.scale)
        return masked_attention(query, keys, values, start_pos, n_tokens, self.scale)
