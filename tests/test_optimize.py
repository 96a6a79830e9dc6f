"""Placement rules: matching, validation errors, shipped rule files, and that placements are applied."""

import pytest
import torch

from ktransformers.models.loader import load_model
from ktransformers.operators.cpu_quant import CpuQuantExperts, CpuQuantLinear
from ktransformers.operators.cpu_quant import available as cpu_quant_available
from ktransformers.operators.experts import TorchExperts
from ktransformers.operators.linear import TorchLinear
from ktransformers.optimize import optimize
from ktransformers.optimize.optimize import Rules, default_rules_path

RULES = r"""
- match: {name: '^model\.layers\.\d+\.mlp\.experts$'}
  replace: {backend: cpu_quant, device: cpu}
- match: {name: '^model\.layers\.\d+\.self_attn'}
  replace: {backend: torch, device: cpu, dtype: bfloat16}
- match: {name: 'lm_head'}
  replace: {device: cpu, dtype: float16, kwargs: {note: 1}}
- match: {name: '.*'}
  replace: {device: cpu}
"""


def test_first_match_wins_from_the_start_of_the_name():
    rules = Rules.from_yaml_text(RULES)
    experts = rules.placement("model.layers.3.mlp.experts")
    assert (experts.backend, experts.device, experts.dtype) == ("cpu_quant", torch.device("cpu"), torch.float32)
    attn = rules.placement("model.layers.3.self_attn.q_a_proj")
    assert (attn.backend, attn.dtype, attn.rule) == ("torch", torch.bfloat16, "<rules>#1")
    head = rules.placement("lm_head")
    assert (head.backend, head.dtype, head.kwargs) == ("torch", torch.float16, {"note": 1})
    # re.match: a regex must match from the start of the name; '$' is needed to pin its end
    assert rules.placement("model.layers.3.mlp.experts.x").rule == "<rules>#3"
    assert rules.placement("x.lm_head").rule == "<rules>#3"
    assert rules.placement("model.layers.3.mlp.shared_experts.up_proj").rule == "<rules>#3"


@pytest.mark.parametrize("text, message", [
    ("- match: {name: '.*'}\n  replace: {backend: gpu_magic}", r"<rules>#0: unknown backend 'gpu_magic'"),
    ("- match: {name: '(unclosed'}\n  replace: {}", r"<rules>#0: bad regex '\(unclosed'"),
    ("- match: {name: '.*'}\n  replace: {device: tpu}", r"<rules>#0: bad device 'tpu'"),
    ("- match: {name: '.*'}\n  replace: {device: 'cuda:x'}", r"<rules>#0: bad device 'cuda:x'"),
    ("- match: {name: '.*'}\n  replace: {dtype: int8}", r"<rules>#0: bad dtype 'int8'"),
    ("- match: {name: '.*'}\n  replace: {devcie: cpu}", r"'replace' accepts only"),
    ("- match: {class: Linear}\n  replace: {}", r"'match' must be \{name: REGEX\}"),
    ("- match: {name: '.*'}\n  replace: {kwargs: [1]}", r"'kwargs' must be a mapping"),
    ("{}", r"expected a non-empty list of rules"),
    ("- [unclosed", r"not valid YAML"),
])
def test_bad_rules_are_rejected_with_their_position(text, message):
    with pytest.raises(ValueError, match=message):
        Rules.from_yaml_text(text)


def test_unmatched_module_and_missing_file_are_clear(tmp_path):
    rules = Rules.from_yaml_text("- match: {name: 'lm_head'}\n  replace: {device: cpu}", "mine.yaml")
    with pytest.raises(ValueError, match=r"mine\.yaml: no rule matches module 'model\.norm'"):
        rules.placement("model.norm")
    with pytest.raises(ValueError, match=r"nope\.yaml: cannot read optimize rules"):
        Rules.from_file(tmp_path / "nope.yaml")


def test_cuda_rule_without_cuda_is_clear(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rules = Rules.from_file(default_rules_path(cuda=True))
    with pytest.raises(ValueError, match=r"DeepSeek-V3-Chat\.yaml#1: places 'model\.norm' on cuda but CUDA is not"):
        rules.placement("model.norm")


def test_default_rules_follow_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_rules_path().name == "DeepSeek-V3-Chat.yaml"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_rules_path().name == "DeepSeek-V3-Chat-cpu.yaml"


def test_shipped_rule_files_place_deepseek_modules():
    names = ["model.embed_tokens", "model.layers.0.self_attn.q_a_proj", "model.layers.0.mlp.gate_proj",
             "model.layers.5.mlp.experts", "model.layers.5.mlp.shared_experts.down_proj", "model.layers.5.mlp.gate",
             "model.layers.60.self_attn.kv_b_proj", "model.norm", "lm_head"]
    gpu = Rules.from_file(optimize.RULES_DIR / "DeepSeek-V3-Chat.yaml")
    for name in names:
        rule = gpu.rule_for(name)
        if name.endswith("mlp.experts"):
            assert (rule.backend, rule.device, rule.dtype) == ("cpu_quant", "cpu", torch.float32)
        else:
            assert (rule.backend, rule.device, rule.dtype) == ("torch", "cuda", torch.bfloat16), name
    cpu = Rules.from_file(optimize.RULES_DIR / "DeepSeek-V3-Chat-cpu.yaml")
    for name in names:
        placement = cpu.placement(name)
        assert (placement.backend, placement.device, placement.dtype) == ("cpu_quant", torch.device("cpu"),
                                                                          torch.float32)


def test_placements_are_applied_to_the_loaded_model(tiny_model, tmp_path):
    """Attention in bfloat16, everything else float32, experts on cpu_quant: dtypes and classes follow the rules."""
    if not cpu_quant_available():
        pytest.fail("the cpu_quant kernels are not built; run ./install.sh")
    model_dir = tiny_model(quant_mix="q8_0")
    path = tmp_path / "mixed.yaml"
    path.write_text(RULES.replace("dtype: float16, kwargs: {note: 1}", "dtype: float32"))
    mixed = load_model(model_dir / "model.gguf", model_dir, path, max_context=32).model
    layer = mixed.model.layers[1]
    assert isinstance(layer.mlp.experts, CpuQuantExperts)
    assert isinstance(layer.mlp.shared_experts.up_proj, TorchLinear)
    assert layer.mlp.shared_experts.up_proj.weight.dtype == torch.float32
    attn = layer.self_attn
    assert isinstance(attn.q_a_proj, TorchLinear) and attn.q_a_proj.weight.dtype == torch.bfloat16
    assert attn.kv_cache.dtype == torch.bfloat16 and attn.kv_b_proj.w_uk.dtype == torch.bfloat16
    assert mixed.model.norm.weight.dtype == torch.float32

    reference_rules = tmp_path / "torch.yaml"
    reference_rules.write_text("- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n")
    reference = load_model(model_dir / "model.gguf", model_dir, reference_rules, max_context=32).model
    assert isinstance(reference.model.layers[1].mlp.experts, TorchExperts)
    ids = torch.arange(3, 15)[None]
    assert torch.isfinite(mixed(ids, 0)).all()

    def rel_err(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    # Compare module by module on equal inputs: whole-model logits are not comparable, because a
    # bfloat16 rounding can flip a near-tied expert choice and change a token's output entirely.
    x = reference.model.embed_tokens(ids[0])
    assert torch.equal(mixed.model.embed_tokens(ids[0]), x)
    dense_mixed, dense_ref = mixed.model.layers[0](x, 0), reference.model.layers[0](x, 0)
    assert dense_mixed.dtype == torch.float32
    assert 0 < rel_err(dense_mixed, dense_ref) < 2e-2  # bfloat16 attention: close, not equal
    moe_mixed, moe_ref = mixed.model.layers[1].mlp(dense_ref), reference.model.layers[1].mlp(dense_ref)
    assert 0 < rel_err(moe_mixed, moe_ref) < 2e-2  # native kernels quantize activations to 8 bits


def test_cpu_only_default_rules_run_the_model_with_cpu_quant(tiny_model, monkeypatch):
    if not cpu_quant_available():
        pytest.fail("the cpu_quant kernels are not built; run ./install.sh")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model_dir = tiny_model(quant_mix="q4_k_m")
    model = load_model(model_dir / "model.gguf", model_dir, max_context=32).model
    assert isinstance(model.lm_head, CpuQuantLinear) and isinstance(model.model.layers[2].mlp.experts, CpuQuantExperts)
    assert torch.isfinite(model(torch.arange(3, 15)[None], 0)).all()
