"""The tiny model maker: HF config/tokenizer files, llama.cpp-style GGUF, quant mixes, determinism."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from ktransformers.gguf import GGMLType, open_gguf
from ktransformers.tools.make_tiny_model import main, make_tiny_model
from ktransformers.tools.tiny_tokenizer import BOS, CHAT_SPECIALS, EOS, PAD, THINK_TOKENS

ARCH = "deepseek2"


def names(kind, layer=None, suffix="weight"):
    return f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.{suffix}"


T = gguf.MODEL_TENSOR


def test_config_json_loads_in_transformers(tiny_model_dir):
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"] and raw["model_type"] == "deepseek_v3"
    assert raw["scoring_func"] == "sigmoid" and raw["topk_method"] == "noaux_tc"
    assert raw["rope_scaling"]["type"] == "yarn" and raw["tie_word_embeddings"] is False
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert type(config).__name__ == "DeepseekV3Config"
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok) == (256, 3, 8, 2)
    assert (config.n_group, config.topk_group, config.first_k_dense_replace) == (4, 2, 1)
    assert config.rope_parameters["factor"] == 4.0 and config.rope_parameters["original_max_position_embeddings"] == 64
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def test_gguf_metadata_follows_the_config(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    meta = open_gguf(tiny_model_dir / "model.gguf").metadata
    key = lambda template: template.format(arch=ARCH)  # noqa: E731
    K = gguf.Keys
    assert meta[K.General.ARCHITECTURE] == ARCH
    expected = {
        K.LLM.BLOCK_COUNT: config["num_hidden_layers"],
        K.LLM.EMBEDDING_LENGTH: config["hidden_size"],
        K.LLM.CONTEXT_LENGTH: config["max_position_embeddings"],
        K.LLM.FEED_FORWARD_LENGTH: config["intermediate_size"],
        K.LLM.EXPERT_FEED_FORWARD_LENGTH: config["moe_intermediate_size"],
        K.LLM.EXPERT_COUNT: 8, K.LLM.EXPERT_USED_COUNT: 2, K.LLM.EXPERT_SHARED_COUNT: 1,
        K.LLM.LEADING_DENSE_BLOCK_COUNT: 1, K.LLM.EXPERT_WEIGHTS_NORM: True,
        K.LLM.EXPERT_GATING_FUNC: int(gguf.ExpertGatingFuncType.SIGMOID),
        K.LLM.EXPERT_GROUP_COUNT: 4, K.LLM.EXPERT_GROUP_USED_COUNT: 2,
        K.Attention.HEAD_COUNT: 2, K.Attention.Q_LORA_RANK: 256, K.Attention.KV_LORA_RANK: 256,
        K.Attention.KEY_LENGTH: 64 + 32, K.Attention.VALUE_LENGTH: 128,
        K.Rope.DIMENSION_COUNT: 32, K.Rope.SCALING_TYPE: "yarn", K.Rope.SCALING_ORIG_CTX_LEN: 64,
        K.LLM.VOCAB_SIZE: config["vocab_size"],
    }
    for template, value in expected.items():
        assert meta[key(template)] == value, template
    assert meta[key(K.LLM.EXPERT_WEIGHTS_SCALE)] == pytest.approx(2.5)
    assert meta[key(K.Rope.SCALING_FACTOR)] == pytest.approx(4.0)
    assert meta[key(K.Rope.SCALING_YARN_LOG_MUL)] == pytest.approx(0.1)
    assert meta[K.Tokenizer.MODEL] == "gpt2" and meta[K.Tokenizer.PRE] == "deepseek-v3"


def test_tensors_have_llama_cpp_names_and_hf_shapes(tiny_model_dir):
    """Shapes checked against transformers' own DeepseekV3 parameters (built from the same config.json)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    params = {name: tuple(p.shape) for name, p in hf.named_parameters()}
    params.update({name: tuple(b.shape) for name, b in hf.named_buffers()})
    hf_names = {
        T.ATTN_Q_A: "self_attn.q_a_proj.weight", T.ATTN_Q_A_NORM: "self_attn.q_a_layernorm.weight",
        T.ATTN_Q_B: "self_attn.q_b_proj.weight", T.ATTN_KV_A_MQA: "self_attn.kv_a_proj_with_mqa.weight",
        T.ATTN_KV_A_NORM: "self_attn.kv_a_layernorm.weight", T.ATTN_KV_B: "self_attn.kv_b_proj.weight",
        T.ATTN_OUT: "self_attn.o_proj.weight", T.ATTN_NORM: "input_layernorm.weight",
        T.FFN_NORM: "post_attention_layernorm.weight", T.FFN_GATE: "mlp.gate_proj.weight",
        T.FFN_UP: "mlp.up_proj.weight", T.FFN_DOWN: "mlp.down_proj.weight", T.FFN_GATE_INP: "mlp.gate.weight",
        T.FFN_GATE_SHEXP: "mlp.shared_experts.gate_proj.weight", T.FFN_UP_SHEXP: "mlp.shared_experts.up_proj.weight",
        T.FFN_DOWN_SHEXP: "mlp.shared_experts.down_proj.weight", T.FFN_DOWN_EXP: "mlp.experts.down_proj",
    }
    model = open_gguf(tiny_model_dir)
    assert model["token_embd.weight"].shape == params["model.embed_tokens.weight"]
    assert model["output.weight"].shape == params["lm_head.weight"]
    assert model["output_norm.weight"].shape == params["model.norm.weight"]
    expected_names = {"token_embd.weight", "output.weight", "output_norm.weight"}
    for layer in range(3):
        for kind, hf_name in hf_names.items():
            hf_key = f"model.layers.{layer}.{hf_name}"
            if hf_key in params:
                assert model[names(kind, layer)].shape == params[hf_key], hf_key
                expected_names.add(names(kind, layer))
        if layer >= 1:
            experts, two_ff, hidden = params[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
            for kind in (T.FFN_GATE_EXP, T.FFN_UP_EXP):
                assert model[names(kind, layer)].shape == (experts, two_ff // 2, hidden)
            bias = model[names(T.FFN_EXP_PROBS_B, layer, "bias")]
            assert bias.shape == params[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
            expected_names |= {names(T.FFN_GATE_EXP, layer), names(T.FFN_UP_EXP, layer), bias.name}
    assert set(model.tensors) == expected_names
    assert len(model.tensors) == 49


def test_f32_weights_look_like_a_real_init(tiny_model_dir):
    model = open_gguf(tiny_model_dir)
    assert all(t.ggml_type == GGMLType.F32 for t in model.tensors.values())
    weight = model["blk.1.ffn_gate_exps.weight"].data.view(np.float32)
    assert 0.018 < weight.std() < 0.022 and abs(weight.mean()) < 0.001
    norm = model["blk.0.attn_norm.weight"].data.view(np.float32)
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0.05
    bias = model["blk.1.exp_probs_b.bias"].data.view(np.float32)
    assert 0 < np.abs(bias).max() < 0.1


def test_tokenizer_loads_and_matches_gguf_vocabulary(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    meta = open_gguf(tiny_model_dir).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    assert 600 <= len(tokens) <= 1000 and len(tokens) == len(tokenizer)
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids(BOS) == 0
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOS) == 1
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(PAD)
    types = meta["tokenizer.ggml.token_type"]
    for token in [BOS, EOS, PAD, *CHAT_SPECIALS]:
        assert types[tokens.index(token)] == gguf.TokenType.CONTROL, token
    for token in THINK_TOKENS:
        assert types[tokens.index(token)] == gguf.TokenType.USER_DEFINED
    merges = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template


def test_tokenizer_round_trips_mixed_text(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The answer is 42 😀 你好，世界！\ndef f(x):\n    return x * 2  # ok ✅"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) < len(text.encode())  # merges learned something
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for special in [*CHAT_SPECIALS, *THINK_TOKENS]:
        assert tokenizer.encode(special, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(special)]
    thought = tokenizer.encode("<think>plan</think>answer", add_special_tokens=False)
    assert tokenizer.decode(thought, skip_special_tokens=True) == "<think>plan</think>answer"


def test_chat_template_reproduces_the_r1_format(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nThey greet me.\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?<｜Assistant｜>"
    )
    without = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert without == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi"
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    user, assistant = (tokenizer.convert_tokens_to_ids(t) for t in ("<｜User｜>", "<｜Assistant｜>"))
    assert ids[0] == 0 and ids[1] == user and ids[-1] == assistant and ids.count(0) == 1


def test_chat_template_tool_calls(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
        "<｜tool▁sep｜>weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
        "<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>20C<｜tool▁output▁end｜><｜tool▁outputs▁end｜><｜Assistant｜>"
    )


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = make_tiny_model(tmp_path / "a", quant_mix="q8_0", seed=3)
    second = make_tiny_model(tmp_path / "b", quant_mix="q8_0", seed=3)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir()) and "model.gguf" in files
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = make_tiny_model(tmp_path / "c", quant_mix="q8_0", seed=4)
    assert (other / "model.gguf").read_bytes() != (first / "model.gguf").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    small = dict(quant_mix="ud-iq1_s", num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1)
    quantized = [make_tiny_model(tmp_path / name, **small) for name in ("d", "e")]
    assert (quantized[0] / "model.gguf").read_bytes() == (quantized[1] / "model.gguf").read_bytes()


def test_q8_0_mix_matches_gguf_quantizer(tiny_model):
    model = open_gguf(tiny_model(quant_mix="q8_0"))
    for tensor in model.tensors.values():
        expected = GGMLType.F32 if len(tensor.shape) == 1 or "ffn_gate_inp" in tensor.name else GGMLType.Q8_0
        assert tensor.ggml_type == expected, tensor.name
    experts = model["blk.2.ffn_down_exps.weight"]
    values = gguf.quants.dequantize(experts.data.reshape(*experts.shape[:-1], -1), GGMLType.Q8_0)
    assert values.shape == (8, 256, 256) and 0.018 < values.std() < 0.022


def types_of(model):
    return {name: tensor.ggml_type.name for name, tensor in model.tensors.items()}


def test_q4_k_m_mix(tiny_model):
    model = open_gguf(tiny_model(quant_mix="q4_k_m"))
    types = types_of(model)
    assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_q_a.weight"] == "Q4_K" and types["blk.1.ffn_gate_exps.weight"] == "Q4_K"
    # llama.cpp's "more bits" layers: with 3 layers only the last one gets Q6_K for down/value projections.
    assert [types[f"blk.{i}.attn_kv_b.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down_exps.weight"], types["blk.2.ffn_down_exps.weight"]) == (
        "Q4_K", "Q4_K", "Q6_K")
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.attn_norm.weight"] == "F32"
    assert_values_have_weight_spread(model)


def test_ud_iq1_s_mix(tiny_model):
    model = open_gguf(tiny_model(quant_mix="ud-iq1_s"))
    types = types_of(model)
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.2.ffn_up_exps.weight"] == "IQ1_S"
    assert types["blk.1.ffn_down_exps.weight"] == "Q2_K" and types["blk.2.ffn_down_exps.weight"] == "IQ2_XXS"
    assert types["blk.1.ffn_gate_shexp.weight"] == "Q4_K" and types["blk.1.ffn_down_shexp.weight"] == "Q6_K"
    assert types["blk.0.ffn_up.weight"] == "Q4_K" and types["blk.0.attn_kv_b.weight"] == "Q6_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert meta_file_type(model) == gguf.LlamaFileType.MOSTLY_IQ1_S
    assert_values_have_weight_spread(model)


def meta_file_type(model):
    return model.metadata["general.file_type"]


def assert_values_have_weight_spread(model):
    """Decode every quantized tensor with gguf.quants (independent of our decoders)."""
    for tensor in model.tensors.values():
        if tensor.ggml_type != GGMLType.F32:
            values = gguf.quants.dequantize(tensor.data.reshape(*tensor.shape[:-1], -1), tensor.ggml_type)
            assert values.shape == tensor.shape
            assert 0.01 < values.std() < 0.04, tensor.name


def test_deepseek_v2_with_split_kv_b_and_parts(tiny_model):
    directory = tiny_model(arch="deepseek_v2", split=3, kv_b_split=True)
    parts = sorted(p.name for p in directory.glob("*.gguf"))
    assert parts == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    config = AutoConfig.from_pretrained(directory)
    assert type(config).__name__ == "DeepseekV2Config" and config.q_lora_rank is None
    model = open_gguf(directory / parts[1])
    assert model.metadata["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SOFTMAX)
    assert model.metadata["deepseek2.attention.key_length_mla"] == 96
    assert model.metadata["deepseek2.attention.value_length_mla"] == 128
    assert model.metadata["deepseek2.attention.key_length"] == 256 + 32
    assert "deepseek2.attention.q_lora_rank" not in model.metadata
    assert model["blk.0.attn_q.weight"].shape == (2 * 96, 256) and "blk.0.attn_q_a.weight" not in model
    # llama.cpp's converter: k_b per head, transposed to (kv_lora, nope); v_b per head (v_head, kv_lora).
    assert model["blk.0.attn_k_b.weight"].shape == (2, 256, 64)
    assert model["blk.0.attn_v_b.weight"].shape == (2, 128, 256)
    assert "blk.0.attn_kv_b.weight" not in model and "blk.1.exp_probs_b.bias" not in model
    assert len(model.parts) == 3 and all(part.tensors for part in model.parts)
    oracle = [gguf.GGUFReader(directory / name) for name in parts]
    assert sum(len(r.tensors) for r in oracle) == len(model.tensors)
    assert all(r.fields["split.count"].contents() == 3 for r in oracle)


def test_k_quant_fallback_for_short_rows(tiny_model):
    model = open_gguf(tiny_model(quant_mix="q4_k_m", kv_b_split=True, num_hidden_layers=1))
    # rows of 64 are no 256-blocks: llama.cpp's quantizer writes Q5_0 where it wanted Q4_K
    assert model["blk.0.attn_k_b.weight"].ggml_type == GGMLType.Q5_0
    assert model["blk.0.attn_v_b.weight"].ggml_type in (GGMLType.Q4_K, GGMLType.Q6_K)


def test_config_overrides(tmp_path):
    directory = make_tiny_model(tmp_path, num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1)
    config = json.loads((directory / "config.json").read_text())
    assert (config["num_hidden_layers"], config["n_routed_experts"]) == (2, 4)
    model = open_gguf(directory)
    assert model.metadata["deepseek2.block_count"] == 2 and model.metadata["deepseek2.expert_count"] == 4
    assert model["blk.1.ffn_up_exps.weight"].shape == (4, 256, 256) and "blk.2.attn_norm.weight" not in model
    grouped = make_tiny_model(tmp_path / "v2", arch="deepseek_v2", topk_method="group_limited_greedy", n_group=4,
                              topk_group=2, q_lora_rank=256)
    config = AutoConfig.from_pretrained(grouped)
    assert (config.topk_method, config.n_group, config.topk_group, config.q_lora_rank) == ("group_limited_greedy", 4, 2, 256)
    meta = open_gguf(grouped).metadata
    assert (meta["deepseek2.expert_group_count"], meta["deepseek2.expert_group_used_count"]) == (4, 2)
    assert "blk.0.attn_q_a.weight" in open_gguf(grouped)
    with pytest.raises(ValueError, match="unknown config override 'hiden_size'"):
        make_tiny_model(tmp_path / "x", hiden_size=128)
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path / "x", vocab_size=5)
    with pytest.raises(ValueError, match="unknown quant mix 'q3'"):
        make_tiny_model(tmp_path / "x", quant_mix="q3")
    with pytest.raises(ValueError, match="n_group"):
        make_tiny_model(tmp_path / "x", n_group=3)
    with pytest.raises(ValueError, match="split must be between 1 and the number of tensors"):
        make_tiny_model(tmp_path / "x", split=500)
    assert not (tmp_path / "x").exists()  # bad arguments are caught before anything is written


def test_rewriting_a_directory_replaces_the_model(tmp_path):
    make_tiny_model(tmp_path, split=2)
    make_tiny_model(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["model.gguf"]
    assert open_gguf(tmp_path).files == [tmp_path / "model.gguf"]


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path), "--arch", "deepseek_v2", "--quant-mix", "f32", "--seed", "1", "--split", "2"])
    assert "deepseek_v2" in capsys.readouterr().out
    model = open_gguf(tmp_path)
    assert len(model.files) == 2 and model.metadata["general.name"] == "tiny-deepseek-v2"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--quant-mix", "q5"])


def test_gguf_vocabulary_rebuilds_the_same_tokenizer(tiny_model_dir):
    """tokenizer.ggml.* (tokens, merges, types, pre "deepseek-v3") must tokenize exactly like tokenizer.json."""
    from ktransformers.models.tokenizer_from_gguf import tokenizer_from_gguf

    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    rebuilt = tokenizer_from_gguf(open_gguf(tiny_model_dir).metadata, "tiny")
    texts = ["Hello, world! 12345 apples.", "你好，世界！こんにちは", "def f(x):\n\treturn x**2  # 😀 ✅",
             "<｜User｜>Hi<｜Assistant｜><think>\nhmm\n</think>\n\nOK<｜end▁of▁sentence｜>"]
    for text in texts:
        assert rebuilt(text).input_ids == original(text).input_ids, text
