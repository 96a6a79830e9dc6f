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

from .config import DeepseekConfig
from .layers import MLP, MoE, run
from .mla import MLAttention
from .rope import RopeTable


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekConfig, factory, index: int, max_context: int, rope: RopeTable):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = factory.norm(f"{prefix}.input_layernorm")
        self.self_attn = MLAttention(cfg, factory, f"{prefix}.self_attn", max_context, rope)
        self.post_attention_layernorm = factory.norm(f"{prefix}.post_attention_layernorm")
        self.mlp = MoE(cfg, factory, f"{prefix}.mlp") if cfg.is_moe_layer(index) else MLP(factory, f"{prefix}.mlp")

    def forward(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        # the residual stream lives where this layer's input norm lives
        p = self.input_layernorm.placement
        hidden = hidden.to(p.device, p.dtype)
        hidden = hidden + self.self_attn(run(self.input_layernorm, hidden), start_pos).to(p.device, p.dtype)
        return hidden + self.mlp(run(self.post_attention_layernorm, hidden)).to(p.device, p.dtype)


class DeepseekModel(nn.Module):
    def __init__(self, cfg: DeepseekConfig, factory, max_context: int, progress=None):
        super().__init__()
        self.embed_tokens = factory.embedding("model.embed_tokens")
        rope = RopeTable(cfg, max_context)
        layers = []
        for i in range(cfg.num_hidden_layers):
            layers.append(DecoderLayer(cfg, factory, i, max_context, rope))
            if progress is not None:
                progress.update(1)
        self.layers = nn.ModuleList(layers)
        self.norm = factory.norm("model.norm")


class DeepseekV3ForCausalLM(nn.Module):
    """forward(input_ids [1, T], start_pos) -> float32 logits [1, T, vocab], using its static cache.

    Positions start_pos..start_pos+T-1 are written to the cache; T > 1 with start_pos > 0
    (chunked prefill) attends to everything cached before start_pos. One-token forwards go through
    `step_decoder` when the loader sets one (util/cuda_graph.StaticDecoder: CUDA graphs).
    """

    def __init__(self, cfg: DeepseekConfig, factory, max_context: int = 4096, progress=None):
        super().__init__()
        if max_context <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        self.config, self.max_context = cfg, max_context
        self.model = DeepseekModel(cfg, factory, max_context, progress)
        self.lm_head = factory.linear("lm_head")
        # set by the loader on GPU: one-token steps then run through util/cuda_graph.StaticDecoder
        self.step_decoder = None
        # The token ids whose rows the KV cache holds, at positions 0..len-1, kept by forward
        # itself so any caller leaves it exact (util/prefix_cache.py reuses them).
        self.cached_ids: list[int] = []

    def kv_caches(self) -> list[torch.Tensor]:
        """Each layer's compressed KV cache [max_context, kv_lora_rank + rope_dim] (row = position)."""
        return [layer.self_attn.kv_cache for layer in self.model.layers]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape [1, T] (batch size 1), got {tuple(input_ids.shape)}")
        n_tokens = input_ids.shape[1]
        if n_tokens == 0:
            raise ValueError("input_ids is empty")
        if start_pos < 0 or start_pos + n_tokens > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + n_tokens - 1} do not fit the context window of "
                             f"{self.max_context} tokens (max_context)")
        # rows from start_pos on are rewritten: until this call succeeds, none of them is known
        del self.cached_ids[start_pos:]
        if n_tokens == 1 and self.step_decoder is not None:
            logits = self.step_decoder.step(int(input_ids[0, 0]), start_pos)[None, None]
        else:
            hidden = self.model.embed_tokens(input_ids[0])
            for layer in self.model.layers:
                hidden = layer(hidden, start_pos)
            hidden = run(self.model.norm, hidden)
            logits = run(self.lm_head, hidden).float()[None]
        if len(self.cached_ids) == start_pos:  # rows before start_pos were known: the cache now holds a prefix
            self.cached_ids.extend(input_ids[0].tolist())
        return logits
