"""Placement rules: module-name regex -> backend, device, dtype (the upstream KTransformers YAML style).

    - match:
        name: "^model\\.layers\\.\\d+\\.mlp\\.experts$"
      replace:
        backend: cpu_quant      # linear / experts backend name from operators/registry.py
        device: cpu             # cpu, cuda or cuda:N ("cuda" means the loader's cuda device)
        dtype: float32          # float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)
        kwargs: {}              # extra keyword arguments for the backend constructor

Rules are tried in order and the first whose regex matches the start of the module name wins
(`re.match`, as upstream). Every leaf module gets a placement, and so does each
`model.layers.N.self_attn` (where the attention math and its compressed KV cache live).
`backend` only concerns linear and experts modules; norms, embeddings, gates, kv_b and the
attention itself take device and dtype alone.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ktransformers.operators.registry import EXPERTS_BACKENDS, LINEAR_BACKENDS

RULES_DIR = Path(__file__).parent / "rules"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MATCH_KEYS, _REPLACE_KEYS = {"name"}, {"backend", "device", "dtype", "kwargs"}


@dataclass(frozen=True)
class Placement:
    backend: str
    device: torch.device
    dtype: torch.dtype
    kwargs: dict = field(default_factory=dict, hash=False)
    rule: str = ""  # "file#index" of the rule that produced it, for error messages


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    backend: str
    device: str
    dtype: torch.dtype | None
    kwargs: dict
    where: str


def default_rules_path(cuda: bool | None = None) -> Path:
    """One-GPU rules when cuda is available, CPU-only rules otherwise."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return RULES_DIR / ("DeepSeek-V3-Chat.yaml" if cuda else "DeepSeek-V3-Chat-cpu.yaml")


def _parse_rule(item, where: str) -> Rule:
    if not isinstance(item, dict) or set(item) - {"match", "replace"} or "match" not in item:
        raise ValueError(f"{where}: a rule is a mapping with 'match' and 'replace', got {item!r}")
    match, replace = item["match"], item.get("replace") or {}
    if not isinstance(match, dict) or set(match) != _MATCH_KEYS:
        raise ValueError(f"{where}: 'match' must be {{name: REGEX}}, got {match!r}")
    if not isinstance(replace, dict) or set(replace) - _REPLACE_KEYS:
        raise ValueError(f"{where}: 'replace' accepts only {sorted(_REPLACE_KEYS)}, got {replace!r}")
    try:
        pattern = re.compile(str(match["name"]))
    except re.error as e:
        raise ValueError(f"{where}: bad regex {match['name']!r}: {e}") from None

    backend = replace.get("backend", "torch")
    known = sorted(set(LINEAR_BACKENDS) | set(EXPERTS_BACKENDS))
    if backend not in known:
        raise ValueError(f"{where}: unknown backend {backend!r}; known: {known}")

    device = str(replace.get("device", "cuda"))
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: bad device {device!r}; use cpu, cuda or cuda:N")

    dtype = replace.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{where}: bad dtype {dtype!r}; use one of {sorted(DTYPES)}")
    kwargs = replace.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: 'kwargs' must be a mapping, got {kwargs!r}")
    return Rule(pattern, backend, device, DTYPES.get(dtype), kwargs, where)


class Rules:
    """An ordered rule list; `placement(module_name)` applies the first matching rule."""

    def __init__(self, rules: list[Rule], source: str = "<rules>", cuda_device: str = "cuda"):
        self.rules, self.source, self.cuda_device = rules, source, cuda_device

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<rules>", cuda_device: str = "cuda") -> "Rules":
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: not valid YAML ({e})") from None
        if not isinstance(items, list) or not items:
            raise ValueError(f"{source}: expected a non-empty list of rules")
        return cls([_parse_rule(item, f"{source}#{i}") for i, item in enumerate(items)], source, cuda_device)

    @classmethod
    def from_file(cls, path, cuda_device: str = "cuda") -> "Rules":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"{path}: cannot read optimize rules ({e.strerror})") from None
        return cls.from_yaml_text(text, str(path), cuda_device)

    def rule_for(self, module_name: str) -> Rule:
        for rule in self.rules:
            if rule.pattern.match(module_name):
                return rule
        raise ValueError(f"{self.source}: no rule matches module {module_name!r}; add a catch-all rule "
                         "(name: '.*') at the end")

    def placement(self, module_name: str) -> Placement:
        rule = self.rule_for(module_name)
        device = torch.device(self.cuda_device if rule.device == "cuda" else rule.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{rule.where}: places {module_name!r} on {device} but CUDA is not available "
                             "(use the CPU rules, e.g. DeepSeek-V3-Chat-cpu.yaml)")
        if device.type == "cuda" and device.index is None:  # tensors report cuda:N; compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = rule.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return Placement(rule.backend, device, dtype, dict(rule.kwargs), rule.where)
