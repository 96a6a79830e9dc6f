"""Which tensors a DeepSeek2-architecture GGUF holds, their ggml types per quant mix, and their bytes.

Tensor names come from the `gguf` package (llama.cpp's names); shapes are in torch order
(a linear weight is (out_features, in_features); ggml's `ne` is the reverse).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, quants

from ktransformers.gguf.ggml_types import GGMLType, block_info

QUANT_MIXES = ("f32", "q8_0", "q4_k_m", "ud-iq1_s")
WEIGHT_STD = 0.02
NORM_NOISE_STD = 0.1
ROUTER_BIAS_STD = 0.01
T = MODEL_TENSOR


@dataclass(frozen=True)
class TensorSpec:
    kind: MODEL_TENSOR
    layer: int | None
    shape: tuple[int, ...]  # torch order

    @property
    def name(self) -> str:
        # exp_probs_b is a bias (HF: e_score_correction_bias), everything else a weight.
        suffix = "bias" if self.kind == T.FFN_EXP_PROBS_B else "weight"
        return f"{TENSOR_NAMES[self.kind].format(bid=self.layer)}.{suffix}"

    @property
    def is_vector(self) -> bool:
        return len(self.shape) == 1


def tensor_plan(config: dict, kv_b_split: bool = False) -> list[TensorSpec]:
    """Every tensor of the model, in file order."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, q_lora, kv_lora = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    experts, moe_ff = config["n_routed_experts"], config["moe_intermediate_size"]
    shared_ff = moe_ff * config["n_shared_experts"]

    plan = [TensorSpec(T.TOKEN_EMBD, None, (vocab, hidden))]
    for layer in range(config["num_hidden_layers"]):
        def add(kind, *shape):
            plan.append(TensorSpec(kind, layer, shape))

        add(T.ATTN_NORM, hidden)
        if q_lora:
            add(T.ATTN_Q_A, q_lora, hidden)
            add(T.ATTN_Q_A_NORM, q_lora)
            add(T.ATTN_Q_B, heads * (nope + rope), q_lora)
        else:
            add(T.ATTN_Q, heads * (nope + rope), hidden)
        add(T.ATTN_KV_A_MQA, kv_lora + rope, hidden)
        add(T.ATTN_KV_A_NORM, kv_lora)
        if kv_b_split:
            # llama.cpp's converter splits kv_b per head into k_b (stored transposed: (heads, kv_lora, nope))
            # and v_b (heads, v_dim, kv_lora), so attention can absorb them into q and the output.
            add(T.ATTN_K_B, heads, kv_lora, nope)
            add(T.ATTN_V_B, heads, v_dim, kv_lora)
        else:
            add(T.ATTN_KV_B, heads * (nope + v_dim), kv_lora)
        add(T.ATTN_OUT, hidden, heads * v_dim)
        add(T.FFN_NORM, hidden)
        if layer < config["first_k_dense_replace"]:
            add(T.FFN_GATE, config["intermediate_size"], hidden)
            add(T.FFN_UP, config["intermediate_size"], hidden)
            add(T.FFN_DOWN, hidden, config["intermediate_size"])
            continue
        add(T.FFN_GATE_INP, experts, hidden)
        if config["topk_method"] == "noaux_tc":
            add(T.FFN_EXP_PROBS_B, experts)
        add(T.FFN_GATE_EXP, experts, moe_ff, hidden)
        add(T.FFN_UP_EXP, experts, moe_ff, hidden)
        add(T.FFN_DOWN_EXP, experts, hidden, moe_ff)
        if shared_ff:
            add(T.FFN_GATE_SHEXP, shared_ff, hidden)
            add(T.FFN_UP_SHEXP, shared_ff, hidden)
            add(T.FFN_DOWN_SHEXP, hidden, shared_ff)
    plan.append(TensorSpec(T.OUTPUT_NORM, None, (hidden,)))
    plan.append(TensorSpec(T.OUTPUT, None, (vocab, hidden)))
    return plan


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule for which layers' value/down projections get Q6_K."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


_V_LIKE = {T.ATTN_KV_B, T.ATTN_V_B}
_DOWN = {T.FFN_DOWN, T.FFN_DOWN_EXP, T.FFN_DOWN_SHEXP}


def choose_type(spec: TensorSpec, quant_mix: str, config: dict) -> GGMLType:
    """The ggml type of one tensor under a quant mix, imitating llama.cpp / Unsloth recipes."""
    if quant_mix not in QUANT_MIXES:
        raise ValueError(f"unknown quant mix {quant_mix!r}; choose one of {QUANT_MIXES}")
    # Like llama.cpp: norms, biases and the router stay F32 in every mix.
    if quant_mix == "f32" or spec.is_vector or spec.kind == T.FFN_GATE_INP:
        return GGMLType.F32
    if quant_mix == "q8_0":
        wanted = GGMLType.Q8_0
    elif quant_mix == "q4_k_m":
        wanted = _q4_k_m(spec, config)
    else:
        wanted = _ud_iq1_s(spec, config)
    return _fit_row(wanted, spec.shape[-1])


def _q4_k_m(spec: TensorSpec, config: dict) -> GGMLType:
    if spec.kind == T.OUTPUT:
        return GGMLType.Q6_K
    if spec.kind in _V_LIKE | _DOWN and _more_bits(spec.layer, config["num_hidden_layers"]):
        return GGMLType.Q6_K
    return GGMLType.Q4_K


def _ud_iq1_s(spec: TensorSpec, config: dict) -> GGMLType:
    """Unsloth's dynamic 1.58-bit R1 recipe: 1-bit routed gate/up, 2-bit routed down, the rest 4-6 bit."""
    if spec.kind in (T.FFN_GATE_EXP, T.FFN_UP_EXP):
        return GGMLType.IQ1_S
    if spec.kind == T.FFN_DOWN_EXP:
        return GGMLType.Q2_K if spec.layer == config["first_k_dense_replace"] else GGMLType.IQ2_XXS
    if spec.kind in (T.OUTPUT, T.FFN_DOWN_SHEXP) or spec.kind in _V_LIKE:
        return GGMLType.Q6_K
    return GGMLType.Q4_K


# llama.cpp's quantizer (llama-quant.cpp, tensor_type_fallback): the 32-block type a 256-block type
# becomes for rows that are no whole number of 256-blocks (DeepSeek's attn_k_b rows are 128 wide)
_ROW_FALLBACK = {
    **dict.fromkeys((GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
                     GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ4_XS), GGMLType.IQ4_NL),
    GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0,
}


def _fit_row(wanted: GGMLType, row_length: int) -> GGMLType:
    """The type llama.cpp's quantizer writes for `wanted` on rows of row_length: wanted where its blocks
    fit, else its 32-block fallback (_ROW_FALLBACK), else F32 here (llama.cpp: F16)."""
    if row_length % block_info(wanted)[0] == 0:
        return wanted
    fallback = _ROW_FALLBACK.get(wanted, GGMLType.Q8_0)
    return fallback if row_length % block_info(fallback)[0] == 0 else GGMLType.F32


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """One generator per tensor, so a tensor's values depend only on the seed and its name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def tensor_values(spec: TensorSpec, ggml_type: GGMLType, seed: int) -> np.ndarray:
    """The array to hand GGUFWriter: float32 in torch shape, or uint8 blocks of shape (..., row bytes)."""
    rng = tensor_rng(seed, spec.name)
    if spec.kind == T.FFN_EXP_PROBS_B:
        return (rng.standard_normal(spec.shape, dtype=np.float32) * ROUTER_BIAS_STD).astype(np.float32)
    if spec.is_vector:  # RMSNorm weights: around 1
        return (1.0 + rng.standard_normal(spec.shape, dtype=np.float32) * NORM_NOISE_STD).astype(np.float32)
    if ggml_type == GGMLType.F32:
        return rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(WEIGHT_STD)
    if ggml_type == GGMLType.Q8_0:
        # gguf.quants can quantize Q8_0 itself: real normal weights, round-tripped through the format.
        weights = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(WEIGHT_STD)
        return quants.quantize(weights, ggml_type)
    from ktransformers.gguf.random_blocks import random_quant_bytes

    elements, nbytes = block_info(ggml_type)
    raw = np.asarray(random_quant_bytes(ggml_type, spec.shape, rng, WEIGHT_STD), dtype=np.uint8)
    return raw.reshape(*spec.shape[:-1], spec.shape[-1] // elements * nbytes)
