"""The DeepSeek model loaded from GGUF by our loader vs Hugging Face transformers on the same weights.

The HF side reads the GGUF with the `gguf` package's own reader and dequantizer (independent of
ktransformers.gguf) and maps GGUF names to HF names here, in the test.

Error measure: rel_err(a, b) = max|a - b| / max|b| over all logits of a step (b = reference).
"""

import inspect
import warnings

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from ktransformers.models.loader import load_model

TOL = 1e-4
PROMPT_LEN, DECODE_STEPS = 20, 16
TORCH_CPU_RULES = "- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n"

# GGUF (llama.cpp deepseek2) tensor name stem -> HF DeepseekV2/V3 parameter name
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def read_gguf_floats(path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized by the gguf package, in torch order."""
    out = {}
    for t in GGUFReader(path).tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (0, 1):  # not F32/F16: raw blocks
            data = gguf_dequantize(data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(data, dtype=np.float32))
    return out


def hf_state_dict(tensors: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    heads, nope, v_dim = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    sd, fused = {}, {}  # fused: per layer, the GGUF tensors HF stores combined
    for name, value in tensors.items():
        parts = name.split(".")
        if parts[0] != "blk":
            sd[f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"] = value
            continue
        layer, stem, prefix = parts[1], parts[2], f"model.layers.{parts[1]}."
        if stem == "exp_probs_b":
            sd[prefix + "mlp.gate.e_score_correction_bias"] = value
        elif stem.endswith("_exps") or stem in ("attn_k_b", "attn_v_b"):
            fused.setdefault(layer, {})[stem] = value
        else:
            sd[prefix + LAYER_NAMES[stem] + ".weight"] = value
    for layer, group in fused.items():
        prefix = f"model.layers.{layer}."
        if "attn_k_b" in group:  # llama.cpp's split: k_b (H, kv_lora, nope) transposed, v_b (H, v, kv_lora)
            kv_b = torch.cat([group["attn_k_b"].transpose(1, 2), group["attn_v_b"]], dim=1)
            sd[prefix + "self_attn.kv_b_proj.weight"] = kv_b.reshape(heads * (nope + v_dim), -1)
        if "ffn_gate_exps" in group:
            sd[prefix + "mlp.experts.gate_up_proj"] = torch.cat([group["ffn_gate_exps"], group["ffn_up_exps"]], 1)
            sd[prefix + "mlp.experts.down_proj"] = group["ffn_down_exps"]
    return sd


def hf_model(model_dir, gguf_path):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = {"deepseek_v3": transformers.DeepseekV3ForCausalLM,
           "deepseek_v2": transformers.DeepseekV2ForCausalLM}[config.model_type]
    model = cls(config).float().eval()
    state = hf_state_dict(read_gguf_floats(gguf_path), config.to_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "torch_cpu.yaml"
    path.write_text(TORCH_CPU_RULES)
    return path


def prompt_ids(vocab: int, n: int = PROMPT_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def cache_keyword(reference) -> str:
    """transformers renames forward's past_key_values to cache (deprecated in 5.x, gone in 5.40)."""
    return "cache" if "cache" in inspect.signature(reference.forward).parameters else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def compare_with_hf(ours, reference, vocab: int):
    """Prefill PROMPT_LEN tokens, then DECODE_STEPS greedy steps; HF uses its own KV cache."""
    ids = prompt_ids(vocab)
    keyword = cache_keyword(reference)
    with torch.no_grad():
        ref = reference(input_ids=ids, use_cache=True)
        got = ours(ids, 0)
        assert got.shape == ref.logits.shape and got.dtype == torch.float32
        assert rel_err(got, ref.logits) < TOL, "prefill"
        past, pos = returned_cache(ref), ids.shape[1]
        for step in range(DECODE_STEPS):
            token = ref.logits[:, -1:].argmax(-1)
            with warnings.catch_warnings():  # the deprecation notice of the keyword we just checked
                warnings.simplefilter("ignore", FutureWarning)
                ref = reference(input_ids=token, use_cache=True, **{keyword: past})
            past = returned_cache(ref)
            got = ours(token, pos)
            assert rel_err(got, ref.logits) < TOL, f"decode step {step}"
            pos += 1


@pytest.mark.parametrize("arch, overrides", [
    ("deepseek_v3", {}),
    ("deepseek_v2", {}),  # softmax gating, greedy top-k, q_lora_rank null (q_proj)
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
])
def test_logits_match_hf(tiny_model, rules, arch, overrides):
    model_dir = tiny_model(arch=arch, **overrides)
    loaded = load_model(model_dir / "model.gguf", model_dir, rules, max_context=64)
    compare_with_hf(loaded.model, hf_model(model_dir, model_dir / "model.gguf"), loaded.config.vocab_size)


def test_chunked_prefill_equals_one_shot(tiny_model, rules):
    model_dir = tiny_model()
    model = load_model(model_dir / "model.gguf", model_dir, rules, max_context=64).model
    ids = prompt_ids(model.config.vocab_size)
    one_shot = model(ids, 0)
    chunks = [model(ids[:, i:i + 7], i) for i in range(0, ids.shape[1], 7)]
    assert rel_err(torch.cat(chunks, dim=1), one_shot) < 1e-5
    # and the cache written by chunks serves the next decode step like the one-shot cache does
    token = one_shot[:, -1:].argmax(-1)
    after_chunks = model(token, ids.shape[1])
    model(ids, 0)
    assert rel_err(after_chunks, model(token, ids.shape[1])) < 1e-5


def split_kv_b_copy(src, dst, cfg):
    """Rewrite a GGUF the way newer llama.cpp converters store MLA: attn_kv_b -> attn_k_b (transposed) + attn_v_b."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    heads, nope, v_dim = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith("attn_kv_b.weight"):
            per_head = data.reshape(heads, nope + v_dim, -1)
            k_b = per_head[:, :nope].transpose(0, 2, 1)  # stored transposed: (heads, kv_lora, nope)
            writer.add_tensor(t.name.replace("kv_b", "k_b"), np.ascontiguousarray(k_b))
            writer.add_tensor(t.name.replace("kv_b", "v_b"), np.ascontiguousarray(per_head[:, nope:]))
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_kv_b_split_gguf_gives_same_logits(tiny_model, rules, tmp_path):
    model_dir = tiny_model()
    config = transformers.AutoConfig.from_pretrained(model_dir).to_dict()
    split_path = tmp_path / "split.gguf"
    split_kv_b_copy(model_dir / "model.gguf", split_path, config)
    ids = prompt_ids(config["vocab_size"])
    fused = load_model(model_dir / "model.gguf", model_dir, rules, max_context=64).model(ids, 0)
    split_model = load_model(split_path, model_dir, rules, max_context=64).model
    names = {t.name for t in GGUFReader(split_path).tensors}
    assert "blk.0.attn_k_b.weight" in names and "blk.0.attn_kv_b.weight" not in names
    assert rel_err(split_model(ids, 0), fused) < 1e-5


def test_kv_b_split_tiny_model_matches_hf(tiny_model, rules):
    """The maker's own split file (k_b/v_b with their own values) against HF with kv_b reassembled."""
    model_dir = tiny_model(kv_b_split=True)
    loaded = load_model(model_dir / "model.gguf", model_dir, rules, max_context=64)
    compare_with_hf(loaded.model, hf_model(model_dir, model_dir / "model.gguf"), loaded.config.vocab_size)


@pytest.mark.parametrize("quant_mix", ["q8_0", "q4_k_m", "ud-iq1_s"])
def test_quantized_mix_matches_dequantized_float_model(tiny_model, rules, quant_mix):
    model_dir = tiny_model(quant_mix=quant_mix)
    loaded = load_model(model_dir / "model.gguf", model_dir, rules, max_context=64)
    compare_with_hf(loaded.model, hf_model(model_dir, model_dir / "model.gguf"), loaded.config.vocab_size)


def test_without_model_path_same_logits_and_tokens(tiny_model, rules):
    model_dir = tiny_model()
    with_dir = load_model(model_dir / "model.gguf", model_dir, rules, max_context=64)
    gguf_only = load_model(model_dir / "model.gguf", None, rules, max_context=64)
    ids = prompt_ids(with_dir.config.vocab_size)
    assert torch.equal(gguf_only.model(ids, 0), with_dir.model(ids, 0))
    texts = ["Hello world, this is a test.", "Numbers 1234567 and 3.14159!", "你好，世界。こんにちは カタカナ",
             "don't STOP  spaces\n\nnew\tlines",
             "<｜User｜>Hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>"]
    for text in texts:
        assert gguf_only.tokenizer(text).input_ids == with_dir.tokenizer(text).input_ids, text
        ids_ = with_dir.tokenizer(text).input_ids
        assert gguf_only.tokenizer.decode(ids_) == with_dir.tokenizer.decode(ids_)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert (gguf_only.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == with_dir.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert gguf_only.tokenizer.eos_token_id == with_dir.tokenizer.eos_token_id == with_dir.config.eos_token_id
