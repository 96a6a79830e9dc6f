"""Next-token sampling: penalties, temperature, top-k / top-p / min-p filters, seeded draws.

Order follows Hugging Face `generate`: repetition penalty, then OpenAI presence/frequency
penalties, then temperature, top-k, top-p, min-p. Temperature 0 means greedy (argmax of the
penalized logits). Draws use a private `torch.Generator`, so a seed reproduces the output
whatever else uses the global RNG.
"""

import math
import secrets
from dataclasses import dataclass, fields
from typing import Iterable

import torch


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]; 1 = off
    top_k: int = 0  # tokens kept; 0 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # HF-style, on prompt + generated tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI semantics, on generated tokens, [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI semantics, on generated tokens, [-2, 2]
    seed: int | None = None

    def __post_init__(self):
        def check(name, ok, rule):
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {rule}")

        check("temperature", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
        check("top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check("top_k", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "an integer >= 0 (0 disables it)")
        check("min_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
        check("repetition_penalty", lambda v: _is_number(v) and v > 0, "a finite number > 0")
        check("presence_penalty", lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]")
        check("frequency_penalty", lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]")
        check("seed", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
              "an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, generation_config, **overrides) -> "SamplingParams":
        """Defaults from a model's generation_config (an object or dict), then `overrides`
        (None values are ignored). A config with do_sample false means greedy."""
        config = generation_config or {}
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
        values = {}
        for field in fields(cls):
            value = get(field.name)
            if value is not None:
                values[field.name] = value
        if get("do_sample") is False:
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Sampler:
    """Picks tokens for one sequence; remembers what it has seen for the penalties."""

    def __init__(self, params: SamplingParams | None = None, prompt_ids: Iterable[int] = ()):
        self.params = params or SamplingParams(temperature=0.0)
        self._prompt_ids = [int(t) for t in prompt_ids]
        self._generated_counts = None  # float tensor [vocab], created on the logits' device
        self._seen = None  # bool tensor [vocab]: prompt + generated
        self._generator = None

    def _state_for(self, logits: torch.Tensor):
        if self._generated_counts is None or self._generated_counts.device != logits.device:
            vocab = logits.shape[-1]
            counts = torch.zeros(vocab, dtype=torch.float32, device=logits.device)
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            if self._generated_counts is not None:
                counts.copy_(self._generated_counts)
                seen.copy_(self._seen)
            elif self._prompt_ids:
                seen[torch.tensor(self._prompt_ids, device=logits.device)] = True
            self._generated_counts, self._seen = counts, seen
        return self._generated_counts, self._seen

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalized, temperature-scaled, filtered logits [vocab] (filtered entries are -inf)."""
        if logits.dim() != 1:
            raise ValueError(f"Sampler expects logits of shape [vocab], got {tuple(logits.shape)}")
        p = self.params
        counts, seen = self._state_for(logits)
        scores = logits.float().clone()
        if p.repetition_penalty != 1.0:
            penalized = torch.where(scores < 0, scores * p.repetition_penalty,
                                    scores / p.repetition_penalty)
            scores = torch.where(seen, penalized, scores)
        if p.frequency_penalty or p.presence_penalty:
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        if p.greedy:
            return scores
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k:
            scores = keep_top_k(scores, p.top_k)
        if p.top_p < 1.0:
            scores = keep_top_p(scores, p.top_p)
        if p.min_p > 0.0:
            scores = keep_min_p(scores, p.min_p)
        return scores

    def sample(self, logits: torch.Tensor) -> int:
        """Choose the next token from logits [vocab] and record it as generated."""
        scores = self.process(logits)
        if self.params.greedy:
            token = int(torch.argmax(scores))
        else:
            # Exponential race: argmax(p_i / E_i) with E_i = -log(U_i) ~ Exp(1) picks i with
            # probability p_i in one pass (torch.multinomial and exponential_ are far slower).
            probs = torch.softmax(scores, dim=-1)
            uniform = torch.rand(probs.shape, generator=self._generator_for(scores),
                                 device=probs.device)
            token = int(torch.argmax(probs / uniform.log_().neg_()))
        self._generated_counts[token] += 1
        self._seen[token] = True
        return token

    def _generator_for(self, scores: torch.Tensor) -> torch.Generator:
        if self._generator is None:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=scores.device).manual_seed(seed)
        return self._generator


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores (and any tied with the k-th)."""
    if k >= scores.shape[-1]:
        return scores
    kth_best = torch.topk(scores, k).values[-1]
    return scores.masked_fill(scores < kth_best, -math.inf)


TOP_P_CANDIDATES = 1024


def keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    probs = torch.softmax(scores, dim=-1)
    # The nucleus is usually small: sort only the best candidates when they hold enough mass
    # (every token outside them then has at least that much mass before it, so it is dropped).
    candidates = min(TOP_P_CANDIDATES, probs.shape[-1])
    sorted_probs, order = torch.topk(probs, candidates)
    if candidates < probs.shape[-1] and float(sorted_probs.sum()) < top_p:
        sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[0] = True  # the most likely token always survives
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep_sorted)
    return scores.masked_fill(~keep, -math.inf)


def keep_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely one's."""
    probs = torch.softmax(scores, dim=-1)
    return scores.masked_fill(probs < min_p * probs.max(), -math.inf)
