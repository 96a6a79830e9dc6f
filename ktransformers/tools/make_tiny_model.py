"""Write a tiny, structurally real DeepSeek V2/V3 model: HF config + tokenizer files and a GGUF.

    python -m ktransformers.tools.make_tiny_model --out DIR --arch deepseek_v3 --quant-mix q4_k_m [--seed 0] [--split N]

The GGUF uses llama.cpp's "deepseek2" architecture, metadata keys and tensor names (taken from the
`gguf` package). Same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np

from .chat_template import CHAT_TEMPLATE
from .tiny_config import ARCHITECTURES, make_config, make_generation_config
from .tiny_tokenizer import BOS, EOS, PAD, THINK_TOKENS, TinyTokenizer, build_tiny_tokenizer
from .tiny_weights import QUANT_MIXES, choose_type, tensor_plan, tensor_values

GGUF_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]  # "deepseek2"
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "ud-iq1_s": gguf.LlamaFileType.MOSTLY_IQ1_S,
}


def make_tiny_model(out_dir, arch: str = "deepseek_v3", quant_mix: str = "f32", seed: int = 0,
                    split: int | None = None, kv_b_split: bool = False, **config_overrides) -> Path:
    """Write config.json, generation_config.json, tokenizer files and model.gguf (or split parts) to `out_dir`.

    `config_overrides` replace top-level config.json keys (e.g. num_hidden_layers=2);
    `kv_b_split=True` writes attn_k_b/attn_v_b (newer llama.cpp files) instead of attn_kv_b.
    Returns `out_dir`.
    """
    if quant_mix not in QUANT_MIXES:
        raise ValueError(f"unknown quant mix {quant_mix!r}; choose one of {QUANT_MIXES}")
    # Everything is validated before the first file is written.
    tokenizer = build_tiny_tokenizer()
    config = make_config(arch, tokenizer.vocab_size, tokenizer.token_id(BOS), tokenizer.token_id(EOS),
                         config_overrides)
    plan = tensor_plan(config, kv_b_split)
    parts = _split_plan(plan, split)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", make_generation_config(config))
    tokenizer.save(out_dir, model_max_length=config["max_position_embeddings"])
    for stale in [*out_dir.glob("model.gguf"), *out_dir.glob("model-*-of-*.gguf")]:
        stale.unlink()  # only our own earlier outputs, so the directory holds exactly one model

    if split is None:
        _write_gguf(out_dir / "model.gguf", plan, config, tokenizer, quant_mix, seed, kv_b_split)
        return out_dir
    for number, specs in enumerate(parts):
        path = out_dir / f"model-{number + 1:05d}-of-{len(parts):05d}.gguf"
        # Like llama.cpp's gguf-split, only the first part carries the model's metadata.
        _write_gguf(path, specs, config, tokenizer if number == 0 else None, quant_mix, seed, kv_b_split,
                    split_info=(number, len(parts), len(plan)))
    return out_dir


def _write_gguf(path: Path, specs: list, config: dict, tokenizer: TinyTokenizer | None, quant_mix: str, seed: int,
                kv_b_split: bool, split_info: tuple[int, int, int] | None = None) -> None:
    """One GGUF file holding `specs`; model and tokenizer metadata only when `tokenizer` is given.

    `split_info` = (part number from 0, number of parts, tensors in all parts) for split sets.
    """
    writer = gguf.GGUFWriter(path, GGUF_ARCH)
    if tokenizer is not None:
        _add_model_metadata(writer, config, quant_mix, kv_b_split)
        _add_tokenizer_metadata(writer, tokenizer)
    if split_info is not None:
        number, count, total_tensors = split_info
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, number)
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, count)
        writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, total_tensors)
    for spec in specs:
        ggml_type = choose_type(spec, quant_mix, config)
        values = tensor_values(spec, ggml_type, seed)
        writer.add_tensor(spec.name, values, raw_dtype=None if values.dtype == np.float32 else ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _split_plan(plan: list, split: int | None) -> list[list]:
    if split is None:
        return [plan]
    if not 1 <= split <= len(plan):
        raise ValueError(f"split must be between 1 and the number of tensors ({len(plan)}), got {split}")
    return [list(chunk) for chunk in np.array_split(np.array(plan, dtype=object), split)]


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _add_model_metadata(writer: gguf.GGUFWriter, config: dict, quant_mix: str, kv_b_split: bool) -> None:
    """The deepseek2 hyper-parameters the way llama.cpp's converter writes them."""
    heads, kv_lora, rope = config["num_attention_heads"], config["kv_lora_rank"], config["qk_rope_head_dim"]
    writer.add_name(f"tiny-{config['model_type'].replace('_', '-')}")
    writer.add_file_type(FILE_TYPES[quant_mix])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    if config["q_lora_rank"]:
        writer.add_q_lora_rank(config["q_lora_rank"])
    writer.add_kv_lora_rank(kv_lora)
    if kv_b_split:
        # Newer converter: MLA written as MQA over the latent (one kv head of kv_lora + rope),
        # with the per-head sizes under the *_mla keys.
        writer.add_head_count_kv(1)
        writer.add_key_length(kv_lora + rope)
        writer.add_value_length(kv_lora)
        writer.add_key_length_mla(config["qk_nope_head_dim"] + rope)
        writer.add_value_length_mla(config["v_head_dim"])
    else:
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_key_length(config["qk_nope_head_dim"] + rope)
        writer.add_value_length(config["v_head_dim"])
    writer.add_rope_dimension_count(rope)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_shared_count(config["n_shared_experts"])
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    writer.add_expert_weights_norm(bool(config["norm_topk_prob"]))
    sigmoid = config["scoring_func"] == "sigmoid"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if config["n_group"]:
        writer.add_expert_group_count(config["n_group"])
        writer.add_expert_group_used_count(config["topk_group"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
        # llama.cpp's deepseek2 convention: log multiplier = 0.1 * mscale_all_dim
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: TinyTokenizer) -> None:
    tokens = tokenizer.tokens_by_id()
    specials = tokenizer.special_tokens()
    types = [
        gguf.TokenType.CONTROL if token in specials
        else gguf.TokenType.USER_DEFINED if token in THINK_TOKENS
        else gguf.TokenType.NORMAL
        for token in tokens
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-v3")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(tokenizer.merges())
    writer.add_bos_token_id(tokenizer.token_id(BOS))
    writer.add_eos_token_id(tokenizer.token_id(EOS))
    writer.add_pad_token_id(tokenizer.token_id(PAD))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--arch", default="deepseek_v3", choices=ARCHITECTURES)
    parser.add_argument("--quant-mix", default="f32", choices=QUANT_MIXES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=int, default=None, help="write N parts model-0000i-of-0000N.gguf")
    parser.add_argument("--kv-b-split", action="store_true", help="attn_k_b/attn_v_b instead of attn_kv_b")
    args = parser.parse_args(argv)
    out = make_tiny_model(args.out, args.arch, args.quant_mix, args.seed, args.split, args.kv_b_split)
    print(f"wrote tiny {args.arch} ({args.quant_mix}) to {out}")


if __name__ == "__main__":
    main()
