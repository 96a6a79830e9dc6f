"""A DeepSeek-V3 model with the real widths and a few layers, from random valid blocks: built in
memory (`build_model`) or written as a GGUF file that llama.cpp loads too (`write_gguf`).

In memory, the tensors are QuantTensors over numpy buffers, handed to the models package's
ModuleFactory through a small in-memory stand-in for `open_gguf`'s result. Tensor names,
shapes and per-tensor ggml types come from ktransformers.tools.tiny_weights (llama.cpp's Q4_K_M
and Unsloth's UD-IQ1_S recipes), evaluated for the layer of the 61-layer model each synthetic
layer stands for. Big tensors are one random base of blocks repeated (speed does not depend on
the values), so building tens of GB takes seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ktransformers.gguf import GGMLType, QuantTensor, dequantize, random_quant_bytes, row_nbytes
from ktransformers.models.config import config_from_hf_dict
from ktransformers.models.deepseek_v3 import DeepseekV3ForCausalLM
from ktransformers.models.module_factory import ModuleFactory
from ktransformers.optimize.optimize import Rules, default_rules_path
from ktransformers.tools.tiny_weights import T, choose_type, tensor_plan, tensor_values

DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
    kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    max_position_embeddings=163840, topk_method="noaux_tc",
)
EXPERT_KINDS = (T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)
BASE_BYTES = 1 << 20  # random blocks generated per tensor before repeating


class InMemoryGGUF:
    """The part of `GGUFModel` that ModuleFactory reads: files, tensors, get, `in`."""

    def __init__(self, tensors: dict[str, QuantTensor], source: str):
        self.files, self.tensors, self.metadata, self.architecture = [Path(source)], tensors, {}, "deepseek2"

    def get(self, name, default=None):
        return self.tensors.get(name, default)

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        return self.tensors[name]


def real_layer(index: int, n_dense: int, full: dict) -> int:
    """The 61-layer model's layer a synthetic layer stands for: dense -> itself, MoE j -> an MoE layer
    from the middle, alternating so Q4_K_M's Q4_K/Q6_K down_exps appear about as often as in the full model."""
    if index < n_dense:
        return index
    return full["first_k_dense_replace"] + 5 + (index - n_dense)


def repeated_blocks(ggml_type: GGMLType, rows: int, cols: int, rng) -> np.ndarray:
    """rows x cols of valid random blocks: a few MB of them, repeated by doubling copies."""
    row_bytes = row_nbytes(ggml_type, cols)
    base_rows = max(1, min(rows, BASE_BYTES // row_bytes))
    base = np.asarray(random_quant_bytes(ggml_type, (base_rows, cols), rng, 0.02), dtype=np.uint8).reshape(-1)
    out = np.empty(rows * row_bytes, dtype=np.uint8)
    out[:base.size] = base
    filled = base.size
    while filled < out.size:  # whole rows every time, so every block stays valid
        n = min(filled, out.size - filled)
        out[filled:filled + n] = out[:n]
        filled += n
    return out


def synthetic_config(n_dense: int, n_moe: int, **overrides) -> tuple[dict, dict]:
    """(HF-style config of the synthetic model, the full 61-layer config it imitates)."""
    full = {**DEEPSEEK_V3, **overrides}
    small = {**full, "num_hidden_layers": n_dense + n_moe, "first_k_dense_replace": n_dense}
    return small, full


def planned_types(small: dict, full: dict, mix: str, kv_b_split: bool = False):
    """(spec, ggml type) of every tensor in file order; a layer's types are those of the full-model layer it stands for."""
    n_dense = small["first_k_dense_replace"]
    for spec in tensor_plan(small, kv_b_split):
        as_full = spec if spec.layer is None else dataclasses.replace(spec, layer=real_layer(spec.layer, n_dense, full))
        yield spec, choose_type(as_full, mix, full)


def tensor_stream(small: dict, full: dict, mix: str, seed: int = 0, kv_b_split: bool = False):
    """(spec, ggml type, raw bytes) of every tensor in file order, one at a time (a GGUF writer
    holds one in memory). kv_b_split: attn_k_b + attn_v_b (today's llama.cpp files) instead of attn_kv_b."""
    rng = np.random.default_rng(seed)
    for spec, ggml_type in planned_types(small, full, mix, kv_b_split):
        if spec.is_vector or ggml_type == GGMLType.F32:  # norms, router, routing bias: small, real values
            data = np.ascontiguousarray(tensor_values(spec, ggml_type, seed)).view(np.uint8).reshape(-1)
        else:
            rows = int(np.prod(spec.shape[:-1]))
            data = repeated_blocks(ggml_type, rows, spec.shape[-1], rng)
        yield spec, ggml_type, data


def build_tensors(small: dict, full: dict, mix: str, seed: int = 0, kv_b_split: bool = False) -> dict[str, QuantTensor]:
    return {spec.name: QuantTensor(spec.name, ggml_type, tuple(spec.shape), data)
            for spec, ggml_type, data in tensor_stream(small, full, mix, seed, kv_b_split)}


def routed_matrices_per_token(full: dict, mix: str) -> dict[tuple, int]:
    """(ggml type, rows, cols) -> how many such expert matrices one decoded token reads in the full
    model (top-k experts of every MoE layer)."""
    counts: dict[tuple, int] = {}
    for layer in range(full["first_k_dense_replace"], full["num_hidden_layers"]):
        for spec in tensor_plan({**full, "num_hidden_layers": layer + 1}):
            if spec.layer == layer and spec.kind in EXPERT_KINDS:
                key = (choose_type(spec, mix, full), spec.shape[1], spec.shape[2])
                counts[key] = counts.get(key, 0) + full["num_experts_per_tok"]
    return counts


def routed_bytes_per_token(full: dict, mix: str) -> int:
    """Routed-expert weight bytes one decoded token reads in the full model (top-k experts, every MoE layer)."""
    return sum(n * rows * row_nbytes(t, cols) for (t, rows, cols), n in routed_matrices_per_token(full, mix).items())


def build_model(n_dense: int, n_moe: int, mix: str, cuda: bool, max_context: int = 4096, seed: int = 0,
                n_slots: int = 1, kv_b_split: bool = False, **overrides):
    """(DeepseekV3ForCausalLM placed by the GPU or CPU rules, synthetic config dict, full config dict);
    n_slots: sequences its KV cache holds (batched decode)."""
    small, full = synthetic_config(n_dense, n_moe, **overrides)
    cfg = config_from_hf_dict(small, "synthetic config")
    tensors = build_tensors(small, full, mix, seed, kv_b_split)
    rules = Rules.from_file(default_rules_path(cuda), cuda_device="cuda")
    factory = ModuleFactory(InMemoryGGUF(tensors, f"<synthetic {mix}>"), cfg, rules, dequantize)
    model = DeepseekV3ForCausalLM(cfg, factory, max_context, n_slots=n_slots).eval()
    return model, small, full


def served_model(mix: str, layers: int, dense: int, max_context: int, n_slots: int = 1):
    """A LoadedModel of a synthetic real-width model set up as the server runs it (GPU rules, overlapped
    experts and CUDA graphs when CUDA is present), with the demo model's tokenizer and chat template."""
    import torch

    from ktransformers.demo import demo_paths
    from ktransformers.models.loader import LoadedModel, _set_up_gpu_decode, load_model

    model, _, _ = build_model(dense, layers - dense, mix, torch.cuda.is_available(), max_context, n_slots=n_slots)
    _set_up_gpu_decode(model, cuda_graphs=True)
    demo = load_model(demo_paths()[1], demo_paths()[0], max_context=64)
    return LoadedModel(model, demo.tokenizer, model.config, demo.generation_config)


def write_gguf(path, n_dense: int, n_moe: int, mix: str, seed: int = 0, **overrides) -> Path:
    """A deepseek2 GGUF of the synthetic model with the tiny tokenizer's vocabulary (so embedding and
    lm_head cost next to nothing and the layers dominate), streamed to disk one tensor at a time.
    MLA's kv_b is split into attn_k_b / attn_v_b, as llama.cpp's converter writes DeepSeek-V3 today."""
    import gguf

    from ktransformers.tools.make_tiny_model import GGUF_ARCH, _add_model_metadata, _add_tokenizer_metadata
    from ktransformers.tools.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    small, full = synthetic_config(n_dense, n_moe, **{**overrides, "vocab_size": tokenizer.vocab_size})
    writer = gguf.GGUFWriter(path, GGUF_ARCH)
    _add_model_metadata(writer, {**small, "scoring_func": "sigmoid"}, mix, kv_b_split=True)
    _add_tokenizer_metadata(writer, tokenizer)
    for spec, ggml_type in planned_types(small, full, mix, kv_b_split=True):  # the header: names, shapes, types
        byte_shape = (*spec.shape[:-1], row_nbytes(ggml_type, spec.shape[-1]))
        writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=gguf.GGMLQuantizationType(int(ggml_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, data in tensor_stream(small, full, mix, seed, kv_b_split=True):
        writer.write_tensor_data(data)
    writer.close()
    return Path(path)
