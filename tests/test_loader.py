"""load_model: config from config.json or GGUF metadata, split files, zero-copy hand-off, clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import ktransformers.operators.registry as registry
from ktransformers.gguf import QuantTensor, open_gguf
from ktransformers.models.config import config_from_gguf, load_hf_config
from ktransformers.models.loader import load_model
from ktransformers.models.tokenizer_from_gguf import tokenizer_from_gguf
from ktransformers.operators.experts import TorchExperts
from ktransformers.operators.linear import TorchLinear

TORCH_CPU_RULES = "- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n"


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "torch_cpu.yaml"
    path.write_text(TORCH_CPU_RULES)
    return path


def rewrite_gguf(src, dst, drop=(), metadata=None, tensor_fn=None, new_strings=None):
    """Copy a GGUF with the gguf package, dropping tensors, overriding or adding metadata, or changing tensors."""
    reader = GGUFReader(src)
    metadata = metadata or {}
    arch = metadata.get("general.architecture", reader.fields["general.architecture"].contents())
    writer = GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, metadata.get(key, field.contents()), field.types[0], sub)
    for key, value in (new_strings or {}).items():
        writer.add_string(key, value)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        writer.add_tensor(t.name, tensor_fn(t.name, data) if tensor_fn else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def model_dir_copy(src_dir, dst_dir, **config_changes):
    """The tiny model's HF files (config.json edited) next to a link to its GGUF."""
    dst_dir.mkdir()
    for f in src_dir.iterdir():
        if f.suffix == ".gguf":
            (dst_dir / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst_dir / f.name)
    config = json.loads((dst_dir / "config.json").read_text())
    config.update(config_changes)
    (dst_dir / "config.json").write_text(json.dumps(config))
    return dst_dir


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_gguf_metadata_gives_the_hf_config(tiny_model, arch):
    model_dir = tiny_model(arch=arch)
    g = open_gguf(model_dir / "model.gguf")
    from_gguf = config_from_gguf(g.metadata, g.tensors.keys(), "tiny")
    from_hf = load_hf_config(model_dir)
    assert from_gguf.to_dict() == from_hf.to_dict()
    assert from_gguf.scoring_func == ("sigmoid" if arch == "deepseek_v3" else "softmax")
    assert from_gguf.rope_scaling["factor"] == 4.0 and from_gguf.rope_scaling["mscale_all_dim"] == pytest.approx(1.0)


def test_config_saved_by_transformers_5_reads_the_same(tiny_model, tmp_path):
    """transformers 5 writes rope_parameters {rope_type, rope_theta, ...} instead of rope_scaling + rope_theta."""
    model_dir = tiny_model()
    transformers.AutoConfig.from_pretrained(model_dir).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("rope_scaling") is None and saved["rope_parameters"]["rope_type"] == "yarn"
    assert load_hf_config(tmp_path) == load_hf_config(model_dir)


def test_split_gguf_gives_same_logits(tiny_model, rules):
    single, split = tiny_model(), tiny_model(split=3)
    parts = sorted(split.glob("model-*-of-00003.gguf"))
    assert len(parts) == 3
    ids = torch.arange(5, 17)[None]
    expected = load_model(single / "model.gguf", single, rules, max_context=32).model(ids, 0)
    for path in (parts[1], split):  # any part, or the directory
        assert torch.equal(load_model(path, split, rules, max_context=32).model(ids, 0), expected)


class RecordingLinear(TorchLinear):
    seen = []

    def __init__(self, weight, bias, device, dtype):
        self.seen.append(weight)
        super().__init__(weight, bias, device, dtype)


class RecordingExperts(TorchExperts):
    def __init__(self, gate, up, down, device, dtype):
        RecordingLinear.seen.extend([gate, up, down])
        super().__init__(gate, up, down, device, dtype)


def test_quantized_weights_reach_backends_as_zero_copy_views(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.LINEAR_BACKENDS, "recording", f"{__name__}:RecordingLinear")
    monkeypatch.setitem(registry.EXPERTS_BACKENDS, "recording", f"{__name__}:RecordingExperts")
    recording_rules = tmp_path / "recording.yaml"
    recording_rules.write_text("- match: {name: '.*'}\n  replace: {backend: recording, device: cpu}\n")
    seen = RecordingLinear.seen
    seen.clear()

    model_dir = tiny_model(quant_mix="q4_k_m")
    load_model(model_dir / "model.gguf", model_dir, recording_rules, max_context=16)
    assert len(seen) == 3 * 7 + 2 * 3 + 1  # 7 linears per layer, 2 MoE layers' expert stacks, lm_head
    for t in seen:
        assert isinstance(t, QuantTensor)
        assert t.ggml_type.name in ("Q4_K", "Q6_K"), t.name
        assert not t.data.flags.owndata  # a view into the file's memory map, not a copy


def test_config_and_gguf_mismatch_is_named(tiny_model, rules, tmp_path):
    model_dir = tiny_model()
    wrong = model_dir_copy(model_dir, tmp_path / "wrong", hidden_size=512, num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"config.json does not match .*hidden_size: config says 512, GGUF says 256"
                                         r".*num_hidden_layers: config says 4, GGUF says 3"):
        load_model(model_dir / "model.gguf", wrong, rules)


def test_missing_tensor_is_named(tiny_model, rules, tmp_path):
    model_dir = tiny_model()
    path = rewrite_gguf(model_dir / "model.gguf", tmp_path / "m.gguf", drop={"blk.2.ffn_up_exps.weight"})
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'blk\.2\.ffn_up_exps\.weight' .*model\.layers\.2\.mlp\."
                                         r"experts.* is missing"):
        load_model(path, model_dir, rules)


def test_tensor_of_wrong_shape_is_named(tiny_model, rules, tmp_path):
    model_dir = tiny_model()
    path = rewrite_gguf(model_dir / "model.gguf", tmp_path / "m.gguf",
                        tensor_fn=lambda name, d: d.T.copy() if name == "blk.1.attn_kv_a_mqa.weight" else d)
    with pytest.raises(ValueError, match=r"'blk\.1\.attn_kv_a_mqa\.weight' has shape \(256, 288\) but the config "
                                         r"implies \(288, 256\) for model\.layers\.1\.self_attn\.kv_a_proj_with_mqa"):
        load_model(path, model_dir, rules)


def test_unsupported_architecture_is_named(tiny_model, rules, tmp_path):
    model_dir = tiny_model()
    path = rewrite_gguf(model_dir / "model.gguf", tmp_path / "llama.gguf",
                        metadata={"general.architecture": "llama"})
    with pytest.raises(ValueError, match=r"llama\.gguf: unsupported architecture 'llama'"):
        load_model(path, None, rules)
    bad_dir = model_dir_copy(model_dir, tmp_path / "bad", model_type="llama")
    with pytest.raises(ValueError, match=r"config\.json: model_type 'llama' is not supported"):
        load_model(model_dir / "model.gguf", bad_dir, rules)


def test_tokenizer_json_embedded_in_the_gguf_is_used(tiny_model, tmp_path):
    model_dir = tiny_model()
    path = rewrite_gguf(model_dir / "model.gguf", tmp_path / "m.gguf", metadata={"tokenizer.ggml.model": "none"},
                        new_strings={"tokenizer.huggingface.json": (model_dir / "tokenizer.json").read_text()})
    from_gguf = tokenizer_from_gguf(open_gguf(path).metadata, str(path))
    reference = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = "<｜User｜>Numbers 1234567, 你好 and don't<think>x</think>"
    assert from_gguf(text).input_ids == reference(text).input_ids
    assert from_gguf.eos_token == reference.eos_token


def test_unsupported_gguf_tokenizer_is_named(tiny_model, tmp_path):
    model_dir = tiny_model()
    path = rewrite_gguf(model_dir / "model.gguf", tmp_path / "m.gguf", metadata={"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.model is 'llama'; only byte-level BPE"):
        tokenizer_from_gguf(open_gguf(path).metadata, str(path))


def test_positions_past_max_context_raise(tiny_model, rules):
    model_dir = tiny_model()
    model = load_model(model_dir / "model.gguf", model_dir, rules, max_context=8).model
    model(torch.arange(6)[None], 0)
    with pytest.raises(ValueError, match=r"positions 6\.\.8 do not fit the context window of 8 tokens"):
        model(torch.arange(3)[None], 6)
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        model(torch.arange(3)[None].repeat(2, 1), 0)
