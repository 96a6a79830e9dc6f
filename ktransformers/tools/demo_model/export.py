"""Export the trained demo model (HF DeepseekV3 state dict) to GGUF with the project's own writer.

    python -m ktransformers.tools.demo_model.export --train-dir DIR --out DIR [--types bf16,q8_0,f32]

The tensor plan, names and metadata are make_tiny_model's (llama.cpp "deepseek2" names and keys);
the tokenizer goes in as GGUF vocabulary + merges and, verbatim, as tokenizer.huggingface.json
(its digit-per-token pre-tokenizer has no llama.cpp name). HF -> GGUF layout: every linear weight
keeps its (out, in) layout; the fused experts `gate_up_proj` [E, 2F, H] split into ffn_gate_exps
(first F rows) and ffn_up_exps; `e_score_correction_bias` is exp_probs_b.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import quants

from ..make_tiny_model import GGUF_ARCH, _add_model_metadata, _add_tokenizer_metadata
from ..tiny_tokenizer import TinyTokenizer
from ..tiny_weights import choose_type, tensor_plan
from .train import load_weights

# GGUF tensor kind -> HF parameter name inside model.layers.N (None: a global tensor)
HF_LAYER = {
    T.ATTN_NORM: "input_layernorm.weight", T.FFN_NORM: "post_attention_layernorm.weight",
    T.ATTN_Q_A: "self_attn.q_a_proj.weight", T.ATTN_Q_A_NORM: "self_attn.q_a_layernorm.weight",
    T.ATTN_Q_B: "self_attn.q_b_proj.weight", T.ATTN_KV_A_MQA: "self_attn.kv_a_proj_with_mqa.weight",
    T.ATTN_KV_A_NORM: "self_attn.kv_a_layernorm.weight", T.ATTN_KV_B: "self_attn.kv_b_proj.weight",
    T.ATTN_OUT: "self_attn.o_proj.weight",
    T.FFN_GATE: "mlp.gate_proj.weight", T.FFN_UP: "mlp.up_proj.weight", T.FFN_DOWN: "mlp.down_proj.weight",
    T.FFN_GATE_INP: "mlp.gate.weight", T.FFN_EXP_PROBS_B: "mlp.gate.e_score_correction_bias",
    T.FFN_GATE_SHEXP: "mlp.shared_experts.gate_proj.weight", T.FFN_UP_SHEXP: "mlp.shared_experts.up_proj.weight",
    T.FFN_DOWN_SHEXP: "mlp.shared_experts.down_proj.weight", T.FFN_DOWN_EXP: "mlp.experts.down_proj",
}
HF_GLOBAL = {T.TOKEN_EMBD: "model.embed_tokens.weight", T.OUTPUT_NORM: "model.norm.weight", T.OUTPUT: "lm_head.weight"}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def hf_tensor(state: dict[str, torch.Tensor], spec, config: dict) -> np.ndarray:
    """The float32 values of one GGUF tensor, in torch order."""
    if spec.layer is None:
        value = state[HF_GLOBAL[spec.kind]]
    elif spec.kind in (T.FFN_GATE_EXP, T.FFN_UP_EXP):
        gate_up = state[f"model.layers.{spec.layer}.mlp.experts.gate_up_proj"]
        width = config["moe_intermediate_size"]
        value = gate_up[:, :width] if spec.kind == T.FFN_GATE_EXP else gate_up[:, width:]
    else:
        value = state[f"model.layers.{spec.layer}.{HF_LAYER[spec.kind]}"]
    value = value.detach().float().contiguous().numpy()
    if value.shape != spec.shape:
        raise ValueError(f"{spec.name}: HF tensor has shape {value.shape}, GGUF plan wants {spec.shape}")
    return value


def tensor_bytes(values: np.ndarray, spec, kind: str, config: dict):
    """(array for GGUFWriter.add_tensor, raw ggml type or None) for one tensor under an export type."""
    if spec.is_vector or spec.kind == T.FFN_GATE_INP or kind == "f32":  # norms, biases, router: F32 always
        return values.astype(np.float32), None
    if kind == "bf16":
        raw = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(*values.shape[:-1], values.shape[-1] * 2), gguf.GGMLQuantizationType.BF16
    ggml_type = choose_type(spec, "q8_0", config)
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32), None
    return quants.quantize(values, ggml_type), ggml_type


def write_gguf(path: Path, state: dict, config: dict, tokenizer: TinyTokenizer, kind: str) -> Path:
    writer = gguf.GGUFWriter(path, GGUF_ARCH)
    _add_model_metadata(writer, config, "f32", kv_b_split=False)
    for kv in writer.kv_data:  # the tiny model's name and file type make way for ours
        kv.pop(gguf.Keys.General.NAME, None)
        kv.pop(gguf.Keys.General.FILE_TYPE, None)
    writer.add_name(f"ktransformers-demo-{kind}")  # replaces the tiny model's name
    writer.add_file_type(FILE_TYPES[kind])
    _add_tokenizer_metadata(writer, tokenizer)
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, tokenizer.tokenizer.to_str())
    for spec in tensor_plan(config):
        array, raw_dtype = tensor_bytes(hf_tensor(state, spec, config), spec, kind, config)
        writer.add_tensor(spec.name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export(train_dir: Path, out: Path, kinds=("bf16", "q8_0")) -> list[Path]:
    from tokenizers import Tokenizer

    config = json.loads((train_dir / "config.json").read_text())
    tokenizer = TinyTokenizer(Tokenizer.from_file(str(train_dir / "tokenizer.json")))
    state = load_weights(train_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_gguf(out / f"demo-{kind}.gguf", state, config, tokenizer, kind) for kind in kinds]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--types", default="bf16,q8_0")
    a = p.parse_args(argv)
    for path in export(a.train_dir, a.out, tuple(a.types.split(","))):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
