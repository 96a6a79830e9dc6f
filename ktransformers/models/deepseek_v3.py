"""DeepSeek V2/V3/R1 causal LM with module names mirroring Hugging Face's, so optimize rules read alike.

    model.embed_tokens
    model.layers.N.input_layernorm / post_attention_layernorm
    model.layers.N.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
                              kv_a_layernorm, kv_b_proj, o_proj}
    model.layers.N.mlp.{gate_proj, up_proj, down_proj}                 (first_k_dense_replace layers)
    model.layers.N.mlp.{gate, experts, shared_experts.{gate,up,down}_proj} (MoE layers)
    model.norm, lm_head

Every leaf comes from a `factory` (see module_factory.py) that reads the weights and applies the
placement rule of its name; this file only wires them together.
"""

import torch
from torch import nn

from ktransformers.util.sequence import DEFAULT_PREFILL_CHUNK

from .config import DeepseekConfig
from .layers import MLP, MoE, run
from .mla import MLAttention
from .rope import RopeTable


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekConfig, factory, index: int, max_context: int, rope: RopeTable, n_slots: int):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = factory.norm(f"{prefix}.input_layernorm")
        self.self_attn = MLAttention(cfg, factory, f"{prefix}.self_attn", max_context, rope, n_slots)
        self.post_attention_layernorm = factory.norm(f"{prefix}.post_attention_layernorm")
        self.mlp = MoE(cfg, factory, f"{prefix}.mlp") if cfg.is_moe_layer(index) else MLP(factory, f"{prefix}.mlp")

    def forward(self, hidden: torch.Tensor, start_pos: int, slot: int = 0, last_only: bool = False) -> torch.Tensor:
        """Tokens start_pos.. of the sequence in cache slot `slot` (a prefill chunk or one token).
        last_only: every token's cache row is written, but only the last token's output is returned."""
        return self._residual(hidden, lambda x: self.self_attn(x, start_pos, slot), last_only)

    def forward_rows(self, hidden: torch.Tensor, positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token of each of several sequences (a batched decode step)."""
        return self._residual(hidden, lambda x: self.self_attn.forward_rows(x, positions, slots))

    def _residual(self, hidden: torch.Tensor, attend, last_only: bool = False) -> torch.Tensor:
        # the residual stream lives where this layer's input norm lives
        p = self.input_layernorm.placement
        hidden = hidden.to(p.device, p.dtype)
        hidden = hidden + attend(run(self.input_layernorm, hidden)).to(p.device, p.dtype)
        if last_only:  # the attention filled the cache; no later layer reads the other tokens' outputs
            hidden = hidden[-1:]
        return hidden + self.mlp(run(self.post_attention_layernorm, hidden)).to(p.device, p.dtype)


class DeepseekModel(nn.Module):
    def __init__(self, cfg: DeepseekConfig, factory, max_context: int, progress=None, n_slots: int = 1):
        super().__init__()
        self.embed_tokens = factory.embedding("model.embed_tokens")
        rope = RopeTable(cfg, max_context)
        layers = []
        for i in range(cfg.num_hidden_layers):
            layers.append(DecoderLayer(cfg, factory, i, max_context, rope, n_slots))
            if progress is not None:
                progress.update(1)
        self.layers = nn.ModuleList(layers)
        self.norm = factory.norm("model.norm")


class DeepseekV3ForCausalLM(nn.Module):
    """forward(input_ids [1, T], start_pos, slot=0) -> float32 logits [1, T, vocab] ([1, 1, vocab], the last
    token's, with last_only=True), using its static cache.

    The cache has `n_slots` slots, one sequence each. Positions start_pos..start_pos+T-1 of the slot's
    sequence are written; T > 1 with start_pos > 0 (chunked prefill) attends to everything cached before
    start_pos. `decode(token_ids, positions, slots)` runs one token of each of several sequences in one
    pass (a batched decode step). One-token steps go through `step_decoder` when the loader sets one
    (util/cuda_graph.StaticDecoder: CUDA graphs).
    """

    def __init__(self, cfg: DeepseekConfig, factory, max_context: int = 4096, progress=None, n_slots: int = 1):
        super().__init__()
        if max_context <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        if n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        self.config, self.max_context, self.n_slots = cfg, max_context, n_slots
        self.model = DeepseekModel(cfg, factory, max_context, progress, n_slots)
        self.lm_head = factory.linear("lm_head")
        # set by the loader on GPU: one-token steps then run through util/cuda_graph.StaticDecoder
        self.step_decoder = None
        # prompt tokens per prefill pass (util/utils.generation_steps' default); the loader raises it
        # when the routed experts of long chunks stream to a GPU (hybrid_moe.streamed_prefill_chunk)
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK
        # Per slot, the token ids whose rows its KV cache holds at positions 0..len-1, kept by the
        # forward calls themselves so any caller leaves them exact (util/prefix_cache.py reuses them).
        self.slot_ids: list[list[int]] = [[] for _ in range(n_slots)]

    @property
    def cached_ids(self) -> list[int]:
        """Slot 0's token ids: the one sequence of single-sequence callers."""
        return self.slot_ids[0]

    def kv_caches(self, slot: int = 0) -> list[torch.Tensor]:
        """Each layer's compressed KV cache of one slot [max_context, kv_lora_rank + rope_dim] (row = position)."""
        return [layer.self_attn.kv_slots[slot] for layer in self.model.layers]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"cache slot {slot} does not exist: the model has {self.n_slots} (n_slots)")

    # forward(last_only=True): what a prefill needs, the last token's logits (util/sequence.run_prefill)
    supports_last_only = True

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, slot: int = 0, last_only: bool = False) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape [1, T] (batch size 1), got {tuple(input_ids.shape)}")
        n_tokens = input_ids.shape[1]
        if n_tokens == 0:
            raise ValueError("input_ids is empty")
        if start_pos < 0 or start_pos + n_tokens > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + n_tokens - 1} do not fit the context window of "
                             f"{self.max_context} tokens (max_context)")
        self._check_slot(slot)
        ids = self.slot_ids[slot]
        # rows from start_pos on are rewritten: until this call succeeds, none of them is known
        del ids[start_pos:]
        if n_tokens == 1 and self.step_decoder is not None:
            logits = self.step_decoder.step_batch([int(input_ids[0, 0])], [start_pos], [slot])[None]
        else:
            hidden = self.model.embed_tokens(input_ids[0])
            last = len(self.model.layers) - 1
            for i, layer in enumerate(self.model.layers):
                # with last_only the last layer's MLP, the norm and the head see one token, not the chunk
                hidden = layer(hidden, start_pos, slot, last_only=last_only and i == last)
            logits = self._head(hidden)[None]
        if len(ids) == start_pos:  # rows before start_pos were known: the cache now holds a prefix
            ids.extend(input_ids[0].tolist())
        return logits

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token of each of several sequences: token_ids[b] at positions[b] of slot slots[b] (distinct
        slots) -> float32 logits [B, vocab]."""
        n = len(token_ids)
        if n == 0 or len(positions) != n or len(slots) != n:
            raise ValueError(f"decode needs as many positions and slots as tokens (at least one), got "
                             f"{n} tokens, {len(positions)} positions, {len(slots)} slots")
        if len(set(slots)) != n:
            raise ValueError(f"each sequence of a decode step needs its own cache slot, got slots {slots}")
        for position, slot in zip(positions, slots):
            self._check_slot(slot)
            if not 0 <= position < self.max_context:
                raise ValueError(f"position {position} is outside the context window of {self.max_context} tokens")
            del self.slot_ids[slot][position:]
        if self.step_decoder is not None:
            logits = self.step_decoder.step_batch(token_ids, positions, slots)
        else:
            hidden = self.model.embed_tokens(torch.tensor(token_ids, dtype=torch.long))
            for layer in self.model.layers:
                hidden = layer.forward_rows(hidden, positions, slots)
            logits = self._head(hidden)
        for token, position, slot in zip(token_ids, positions, slots):
            if len(self.slot_ids[slot]) == position:
                self.slot_ids[slot].append(int(token))
        return logits

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return run(self.lm_head, run(self.model.norm, hidden)).float()
