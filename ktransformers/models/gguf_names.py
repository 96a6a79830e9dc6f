"""Module names (Hugging Face spelling) -> GGUF tensor names of llama.cpp's `deepseek2` architecture.

The GGUF base names come from the installed `gguf` package (MODEL_TENSOR -> TENSOR_NAMES), so this
file only says which HF module each one belongs to.
"""

import re

from gguf import MODEL_TENSOR, TENSOR_NAMES

T = MODEL_TENSOR

# HF leaf name inside a layer -> the GGUF tensor holding its weight
LAYER_TENSORS = {
    "input_layernorm": T.ATTN_NORM,
    "post_attention_layernorm": T.FFN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.q_a_proj": T.ATTN_Q_A,
    "self_attn.q_a_layernorm": T.ATTN_Q_A_NORM,
    "self_attn.q_b_proj": T.ATTN_Q_B,
    "self_attn.kv_a_proj_with_mqa": T.ATTN_KV_A_MQA,
    "self_attn.kv_a_layernorm": T.ATTN_KV_A_NORM,
    "self_attn.kv_b_proj": T.ATTN_KV_B,
    "self_attn.o_proj": T.ATTN_OUT,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
    "mlp.gate": T.FFN_GATE_INP,
    "mlp.shared_experts.gate_proj": T.FFN_GATE_SHEXP,
    "mlp.shared_experts.up_proj": T.FFN_UP_SHEXP,
    "mlp.shared_experts.down_proj": T.FFN_DOWN_SHEXP,
}

GLOBAL_TENSORS = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
}

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _name(tensor: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[tensor]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def _split(module_name: str) -> tuple[int | None, str]:
    m = _LAYER_NAME.fullmatch(module_name)
    return (int(m.group(1)), m.group(2)) if m else (None, module_name)


def weight_name(module_name: str) -> str:
    """GGUF name of the weight of a linear / norm / embedding / gate module."""
    layer, leaf = _split(module_name)
    table = LAYER_TENSORS if layer is not None else GLOBAL_TENSORS
    if leaf not in table:
        raise KeyError(f"no GGUF tensor is known for module {module_name!r}")
    return _name(table[leaf], layer)


def bias_name(module_name: str) -> str:
    """GGUF name of an (optional) bias of the module, e.g. `blk.0.attn_output.bias`."""
    return weight_name(module_name).removesuffix(".weight") + ".bias"


def gate_bias_name(module_name: str) -> str:
    """V3 routing bias (e_score_correction_bias) of `model.layers.N.mlp.gate`: blk.N.exp_probs_b.bias."""
    layer, _ = _split(module_name)
    return _name(T.FFN_EXP_PROBS_B, layer, "bias")


def experts_names(module_name: str) -> tuple[str, str, str]:
    """(gate, up, down) expert stacks of `model.layers.N.mlp.experts`."""
    layer, leaf = _split(module_name)
    if layer is None or leaf != "mlp.experts":
        raise KeyError(f"{module_name!r} is not a routed-experts module")
    return tuple(_name(t, layer) for t in (T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP))


def kv_b_split_names(module_name: str) -> tuple[str, str]:
    """Split form of kv_b_proj that newer converters write: attn_k_b [H, kv_lora, nope], attn_v_b [H, v, kv_lora]."""
    layer, _ = _split(module_name)
    return _name(T.ATTN_K_B, layer), _name(T.ATTN_V_B, layer)
