"""Next-token sampling: penalties, temperature, top-k / top-p / min-p filters, seeded draws.

Order follows Hugging Face `generate`: repetition penalty, then OpenAI presence/frequency
penalties, then temperature, top-k, top-p, min-p. Temperature 0 means greedy (argmax of the
penalized logits). Draws use a private `torch.Generator`, so a seed reproduces the output
whatever else uses the global RNG.
"""

import collections
import math
import secrets
from dataclasses import dataclass, fields
from typing import Iterable

import torch


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Temperatures below this decode greedily: dividing logits by ~1e-38 overflows float32 to inf (and
# the probabilities to NaN), while any temperature this small already picks the argmax.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
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
        check("seed", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                              and SEED_RANGE[0] <= v <= SEED_RANGE[1]),
              f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

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
    """Picks tokens for one sequence; remembers what it has seen for the penalties.

    Penalties touch only the seen tokens (a gather and a scatter), not the whole vocabulary.
    """

    def __init__(self, params: SamplingParams | None = None, prompt_ids: Iterable[int] = ()):
        self.params = params or SamplingParams(temperature=0.0)
        self._seen = dict.fromkeys(int(t) for t in prompt_ids)  # ordered set: prompt + generated
        self._generated = collections.Counter()
        self._generator = None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalized, temperature-scaled, filtered logits [vocab] (filtered entries are -inf)."""
        if logits.dim() != 1:
            raise ValueError(f"Sampler expects logits of shape [vocab], got {tuple(logits.shape)}")
        p = self.params
        scores = logits.float().clone()
        if p.repetition_penalty != 1.0 and self._seen:
            ids = torch.tensor(list(self._seen), device=scores.device)
            picked = scores[ids]
            scores[ids] = torch.where(picked < 0, picked * p.repetition_penalty,
                                      picked / p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self._generated:
            ids = torch.tensor(list(self._generated), device=scores.device)
            counts = torch.tensor(list(self._generated.values()), dtype=torch.float32,
                                  device=scores.device)
            scores[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if p.greedy:
            return _finite(scores)
        if p.temperature != 1.0:
            scores = scores / p.temperature
        scores = _finite(scores)
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
            # Inverse CDF with one uniform draw: the first token whose cumulative probability
            # reaches x in (0, total] (filtered tokens add nothing, so they are never hit).
            cdf = torch.cumsum(torch.softmax(scores, dim=-1), dim=-1)
            uniform = torch.rand(1, generator=self._generator_for(scores), device=cdf.device)
            x = (uniform * cdf[-1]).clamp_min(torch.finfo(cdf.dtype).tiny)
            token = min(int(torch.searchsorted(cdf, x)), scores.shape[-1] - 1)   # never past the vocabulary
        self._seen[token] = None
        self._generated[token] += 1
        return token

    def _generator_for(self, scores: torch.Tensor) -> torch.Generator:
        if self._generator is None:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=scores.device).manual_seed(seed)
        return self._generator


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """Overflowed scores (a tiny repetition penalty or temperature divides them into inf) become the
    largest float, so softmax stays a distribution over the vocabulary instead of NaN."""
    big = torch.finfo(scores.dtype).max
    return torch.nan_to_num(scores, nan=-math.inf, posinf=big, neginf=-math.inf)


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
