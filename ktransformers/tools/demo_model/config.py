"""The demo model's config.json: a small DeepSeek-V3 with every feature the engine serves.

MLA with q/kv LoRA ranks and the nope/rope split, YaRN (4096 positions from 1024), one dense
first layer, then MoE layers with a shared expert and 4 routed experts in 2 groups (sigmoid
scores, noaux_tc group routing with the correction bias, top-2, normalized, scaled by 2.5).
Hidden size and expert widths are multiples of 256 so K-quant and IQ rows are whole blocks.
"""

from __future__ import annotations

from ..tiny_config import make_config

DEMO_OVERRIDES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "routed_scaling_factor": 2.5,
}


def demo_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return make_config("deepseek_v3", vocab_size, bos_token_id, eos_token_id, DEMO_OVERRIDES)
