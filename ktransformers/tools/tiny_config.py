"""Hugging Face style config.json / generation_config.json for tiny DeepSeek V2/V3 models.

The defaults are tiny but keep every structural feature of the real models (MLA with q/kv LoRA,
YaRN, dense leading layers, shared + routed experts, grouped routing) and every k-quant row
length a multiple of 256.
"""

from __future__ import annotations

import copy
from typing import Any

ARCHITECTURES = ("deepseek_v3", "deepseek_v2")

_COMMON = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 256,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 128,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
    "torch_dtype": "float32",  # the tiny weights are written as f32 values (real R1 ships bf16)
}

_PER_ARCH = {
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
    "deepseek_v2": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "q_lora_rank": None,  # V2-Lite style: q_proj straight from the hidden state (GGUF attn_q)
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "topk_method": "greedy",  # or "group_limited_greedy" with n_group/topk_group > 1
    },
}

# Filled in from the tokenizer, never overridden.
_DERIVED = ("vocab_size", "bos_token_id", "eos_token_id")


def make_config(arch: str, vocab_size: int, bos_token_id: int, eos_token_id: int, overrides: dict[str, Any]) -> dict:
    """config.json contents; `overrides` replaces top-level keys (unknown keys are an error)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES}")
    config = copy.deepcopy({**_COMMON, **_PER_ARCH[arch]})
    for key, value in overrides.items():
        if key in _DERIVED:
            raise ValueError(f"config key {key!r} comes from the tiny tokenizer and cannot be overridden")
        if key not in config:
            raise ValueError(f"unknown config override {key!r} for {arch}; known keys: {', '.join(sorted(config))}")
        config[key] = copy.deepcopy(value)
    config.update(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    _check(config)
    return config


def _check(config: dict) -> None:
    experts, groups = config["n_routed_experts"], config["n_group"]
    if config["num_experts_per_tok"] > experts:
        raise ValueError("num_experts_per_tok cannot exceed n_routed_experts")
    if groups and (experts % groups or config["topk_group"] > groups):
        raise ValueError(f"n_routed_experts={experts} must split into n_group={groups} groups "
                         f"and topk_group={config['topk_group']} <= n_group")
    if not 0 <= config["first_k_dense_replace"] <= config["num_hidden_layers"]:
        raise ValueError("first_k_dense_replace must be between 0 and num_hidden_layers")


def make_generation_config(config: dict) -> dict:
    """Sampling defaults of DeepSeek-R1."""
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
    }
