"""DeepSeek V2/V3/R1 hyper-parameters, read from a Hugging Face config.json or from GGUF metadata.

V2 and V3 differ only in options (gate scoring, top-k method, q LoRA), so one dataclass
describes both; `architecture` is "deepseek_v2" or "deepseek_v3".
"""

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import ExpertGatingFuncType, Keys

log = logging.getLogger(__name__)

ARCHITECTURES = ("deepseek_v2", "deepseek_v3")
GGUF_ARCHITECTURE = "deepseek2"  # llama.cpp stores V2, V3 and R1 under one name
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass
class DeepseekConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    scoring_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # normalized YaRN parameters, see _normalize_rope_scaling
    rope_interleave: bool = True  # DeepSeek checkpoints (and GGUFs made from them) pair rope dims (x0,x1),(x2,x3)..
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "config"):
        def bad(field_name, reason):
            raise ValueError(f"{source}: field {field_name!r} {reason}")

        if self.architecture not in ARCHITECTURES:
            bad("architecture", f"is {self.architecture!r}; supported: {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(name, f"must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            bad("scoring_func", f"is {self.scoring_func!r}; supported: softmax, sigmoid")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"is {self.topk_method!r}; supported: {TOPK_METHODS}")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"={self.num_experts_per_tok} must be in 1..n_routed_experts")
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.topk_group <= self.n_group:
                bad("topk_group", f"={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"is {self.hidden_act!r}; only silu is supported")
        if self.rope_scaling is not None and self.rope_scaling["type"] != "yarn":
            bad("rope_scaling", f"type {self.rope_scaling['type']!r} is not supported (only yarn)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _normalize_rope_scaling(raw: dict | None, source: str) -> dict | None:
    """Accept old (`rope_scaling: {type: yarn}`) and transformers-5 (`rope_parameters: {rope_type}`) spellings."""
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (DeepSeek uses yarn)")
    if raw.get("factor") is None or raw.get("original_max_position_embeddings") is None:
        raise ValueError(f"{source}: yarn rope scaling needs 'factor' and 'original_max_position_embeddings'")
    return {
        "type": "yarn",
        "factor": float(raw["factor"]),
        "original_max_position_embeddings": int(raw["original_max_position_embeddings"]),
        "beta_fast": float(raw.get("beta_fast") or 32),
        "beta_slow": float(raw.get("beta_slow") or 1),
        "mscale": float(raw.get("mscale") or 0),
        "mscale_all_dim": float(raw.get("mscale_all_dim") or 0),
        "attention_factor": raw.get("attention_factor"),
        "truncate": bool(raw.get("truncate", True)),
    }


def config_from_hf_dict(d: dict, source: str = "config.json") -> DeepseekConfig:
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of {ARCHITECTURES}")
    v3 = model_type == "deepseek_v3"
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")
    rope_params = d.get("rope_parameters") or {}
    rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    max_pos = d.get("max_position_embeddings", 4096)
    rope_scaling = _normalize_rope_scaling(d.get("rope_scaling") or rope_params, source)
    n_routed = d.get("n_routed_experts") or 0
    # transformers' V3 always gates with sigmoid + grouped top-k and its V2 always with softmax,
    # whatever scoring_func/topk_method say; follow the model type the same way.
    topk_method = "noaux_tc" if v3 else (d.get("topk_method") or "greedy")
    cfg = DeepseekConfig(
        architecture=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d.get("moe_intermediate_size") or d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        kv_lora_rank=d["kv_lora_rank"],
        q_lora_rank=d.get("q_lora_rank"),
        qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"],
        n_routed_experts=n_routed,
        n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d.get("num_experts_per_tok") or 0,
        first_k_dense_replace=d.get("first_k_dense_replace") or 0,
        scoring_func="sigmoid" if v3 else "softmax",
        topk_method=topk_method,
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
        norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
        routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rope_interleave=bool(d.get("rope_interleave", True)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        hidden_act=d.get("hidden_act", "silu"),
    )
    cfg.validate(source)
    return cfg


def load_hf_config(model_path) -> DeepseekConfig:
    path = Path(model_path) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (--model_path must hold the Hugging Face config.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf_dict(raw, str(path))


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def config_from_gguf(metadata: dict, tensor_names, source: str) -> DeepseekConfig:
    """Rebuild the config from llama.cpp's `deepseek2.*` keys (what convert_hf_to_gguf writes)."""
    arch = metadata.get(Keys.General.ARCHITECTURE)
    if arch != GGUF_ARCHITECTURE:
        raise ValueError(f"{source}: unsupported architecture {arch!r}; this loader runs {GGUF_ARCHITECTURE!r} "
                         "(DeepSeek V2/V3/R1)")

    def key(template, default=KeyError):
        name = template.format(arch=arch)
        if name in metadata:
            return metadata[name]
        if default is KeyError:
            raise ValueError(f"{source}: metadata key {name!r} is missing")
        return default

    rope_dim = key(Keys.Rope.DIMENSION_COUNT)
    # Newer converters store MLA as MQA (key_length = kv_lora_rank + rope) and put the per-head
    # sizes in *_mla; older files store the per-head sizes in key_length/value_length.
    key_len = key(Keys.Attention.KEY_LENGTH_MLA, None) or key(Keys.Attention.KEY_LENGTH)
    value_len = key(Keys.Attention.VALUE_LENGTH_MLA, None) or key(Keys.Attention.VALUE_LENGTH)
    gating = key(Keys.LLM.EXPERT_GATING_FUNC, None)
    has_bias = any(n.endswith("exp_probs_b.bias") for n in tensor_names)
    sigmoid = gating == ExpertGatingFuncType.SIGMOID or (gating is None and has_bias)
    n_routed = key(Keys.LLM.EXPERT_COUNT, 0)
    n_group = key(Keys.LLM.EXPERT_GROUP_COUNT, None)
    topk_group = key(Keys.LLM.EXPERT_GROUP_USED_COUNT, None)
    if sigmoid and n_group is None and n_routed == 256:
        # V3/R1 files written before the group keys existed: DeepSeek-V3's published 8 groups / top-4.
        n_group, topk_group = 8, 4
        log.warning("%s: no expert_group_count key; assuming DeepSeek-V3's n_group=8, topk_group=4", source)
    n_group, topk_group = n_group or 1, topk_group or 1
    if sigmoid:
        topk_method = "noaux_tc"
    else:
        topk_method = "group_limited_greedy" if n_group > 1 else "greedy"

    rope_scaling = None
    if key(Keys.Rope.SCALING_TYPE, "none") == "yarn":
        # llama.cpp stores 0.1 * mscale_all_dim as yarn_log_multiplier; DeepSeek sets mscale == mscale_all_dim.
        mscale_all_dim = _f32(key(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0)) / 0.1
        rope_scaling = _normalize_rope_scaling({
            "type": "yarn",
            "factor": _f32(key(Keys.Rope.SCALING_FACTOR)),
            "original_max_position_embeddings": key(Keys.Rope.SCALING_ORIG_CTX_LEN),
            "beta_fast": _f32(key(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0)),
            "beta_slow": _f32(key(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)),
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }, source)

    vocab = key(Keys.LLM.VOCAB_SIZE, None) or len(metadata.get(Keys.Tokenizer.LIST, ()))
    cfg = DeepseekConfig(
        architecture="deepseek_v3" if sigmoid else "deepseek_v2",
        vocab_size=vocab,
        hidden_size=key(Keys.LLM.EMBEDDING_LENGTH),
        intermediate_size=key(Keys.LLM.FEED_FORWARD_LENGTH),
        moe_intermediate_size=key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0),
        # block_count includes multi-token-prediction blocks where a converter kept them; they are not run
        num_hidden_layers=key(Keys.LLM.BLOCK_COUNT) - key(Keys.LLM.NEXTN_PREDICT_LAYERS, 0),
        num_attention_heads=key(Keys.Attention.HEAD_COUNT),
        kv_lora_rank=key(Keys.Attention.KV_LORA_RANK),
        q_lora_rank=key(Keys.Attention.Q_LORA_RANK, None) or None,
        qk_nope_head_dim=key_len - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=value_len,
        n_routed_experts=n_routed,
        n_shared_experts=key(Keys.LLM.EXPERT_SHARED_COUNT, 0),
        num_experts_per_tok=key(Keys.LLM.EXPERT_USED_COUNT, 0),
        first_k_dense_replace=key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0),
        scoring_func="sigmoid" if sigmoid else "softmax",
        topk_method=topk_method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(key(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
        routed_scaling_factor=_f32(key(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
        rms_norm_eps=_f32(key(Keys.Attention.LAYERNORM_RMS_EPS, 1e-6)),
        rope_theta=_f32(key(Keys.Rope.FREQ_BASE, 10000.0)),
        rope_scaling=rope_scaling,
        rope_interleave=True,
        max_position_embeddings=key(Keys.LLM.CONTEXT_LENGTH, 4096),
        tie_word_embeddings="output.weight" not in set(tensor_names),
        bos_token_id=metadata.get(Keys.Tokenizer.BOS_ID),
        eos_token_id=metadata.get(Keys.Tokenizer.EOS_ID),
    )
    cfg.validate(source)
    return cfg


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: DeepseekConfig) -> float:
    """1/sqrt(q·k head dim), times YaRN's mscale(factor, mscale_all_dim)^2 as in DeepSeek's reference."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs and rs["mscale_all_dim"]:
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale
