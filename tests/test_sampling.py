"""Sampling against Hugging Face's logits processors and independent computations."""

import collections
import math

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from ktransformers.util.sampling import Sampler, SamplingParams

VOCAB = 64


def random_logits(seed, vocab=VOCAB):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def hf(processor, logits, input_ids=()):
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    return processor(ids, logits[None].clone())[0]


def assert_same_filter(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    logits = random_logits(1)
    ours = Sampler(SamplingParams(temperature=temperature)).process(logits)
    torch.testing.assert_close(ours, hf(TemperatureLogitsWarper(temperature), logits))


@pytest.mark.parametrize("top_k", [1, 5, 40, VOCAB, VOCAB + 10])
def test_top_k_matches_hf(top_k):
    for seed in range(5):
        logits = random_logits(seed)
        ours = Sampler(SamplingParams(top_k=top_k)).process(logits)
        assert_same_filter(ours, hf(TopKLogitsWarper(top_k), logits))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_matches_hf(top_p):
    for seed in range(10):
        logits = random_logits(seed)
        ours = Sampler(SamplingParams(top_p=top_p)).process(logits)
        assert_same_filter(ours, hf(TopPLogitsWarper(top_p), logits))


@pytest.mark.parametrize("scale", [0.1, 8.0])  # flat: the full sort; peaked: only candidates
def test_top_p_matches_hf_on_a_large_vocabulary(scale):
    for seed in range(3):
        logits = random_logits(seed, vocab=5000) * scale
        ours = Sampler(SamplingParams(top_p=0.9)).process(logits)
        expected = hf(TopPLogitsWarper(0.9), logits)
        assert_same_filter(ours, expected)
        kept = int((~torch.isinf(expected)).sum())
        assert kept > 1024 if scale < 1 else kept < 1024


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(min_p):
    for seed in range(5):
        logits = random_logits(seed)
        ours = Sampler(SamplingParams(min_p=min_p)).process(logits)
        assert_same_filter(ours, hf(MinPLogitsWarper(min_p), logits))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf_on_prompt_and_generated(penalty):
    prompt = [3, 5, 5, 9]
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=penalty), prompt)
    history = list(prompt)
    for seed in range(6):
        logits = random_logits(seed)
        expected = hf(RepetitionPenaltyLogitsProcessor(penalty), logits, history)
        torch.testing.assert_close(sampler.process(logits), expected)
        token = sampler.sample(logits)
        assert token == int(expected.argmax())
        history.append(token)


def test_presence_and_frequency_penalties_follow_openai():
    presence, frequency = 0.7, 0.4
    prompt = [1, 2]  # OpenAI penalties count generated tokens only
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=presence,
                                     frequency_penalty=frequency), prompt)
    generated = []
    for seed in range(8):
        logits = random_logits(seed, vocab=6)  # few tokens so repeats happen
        counts = collections.Counter(generated)
        expected = logits.clone()
        for token, count in counts.items():
            expected[token] -= count * frequency + presence
        torch.testing.assert_close(sampler.process(logits), expected)
        generated.append(sampler.sample(logits))
    assert len(set(generated)) < len(generated)


def test_all_filters_chained_match_hf_order():
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    prompt = [4, 8, 15, 16, 23, 42]
    for seed in range(5):
        logits = random_logits(seed)
        expected = hf(RepetitionPenaltyLogitsProcessor(1.2), logits, prompt)
        for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9),
                       MinPLogitsWarper(0.05)):
            expected = hf(warper, expected)
        assert_same_filter(Sampler(params, prompt).process(logits), expected)


def test_greedy_picks_the_argmax():
    sampler = Sampler(SamplingParams(temperature=0))
    for seed in range(5):
        logits = random_logits(seed)
        assert sampler.sample(logits) == int(logits.argmax())
    assert Sampler(None).params.greedy


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
    expected = torch.softmax(hf(TopPLogitsWarper(0.9), hf(TemperatureLogitsWarper(0.8), logits)), -1)
    sampler = Sampler(params)
    n = 6000
    counts = torch.bincount(torch.tensor([sampler.sample(logits) for _ in range(n)]), minlength=6)
    observed = counts / n
    for p, o in zip(expected.tolist(), observed.tolist()):
        assert abs(p - o) < 4 * math.sqrt(max(p * (1 - p), 1e-9) / n) + 1e-9
    assert counts[expected == 0].sum() == 0


def draws(params, n=30):
    sampler = Sampler(params)
    return [sampler.sample(random_logits(i)) for i in range(n)]


def test_seed_reproduces_draws_whatever_the_global_rng():
    params = SamplingParams(temperature=1.2, seed=1234)
    torch.manual_seed(0)
    first = draws(params)
    torch.manual_seed(99)
    torch.rand(100)
    assert draws(params) == first
    assert draws(SamplingParams(temperature=1.2, seed=4321)) != first


def test_unseeded_sampling_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    draws(SamplingParams(temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logits_filter_like_cpu_and_sample_reproducibly():
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
                            presence_penalty=0.3, frequency_penalty=0.2, seed=11)
    logits = random_logits(3, vocab=129280)
    on_cpu = Sampler(params, [1, 2, 3]).process(logits)
    on_gpu = Sampler(params, [1, 2, 3]).process(logits.cuda())
    assert on_gpu.is_cuda
    assert_same_filter(on_gpu.cpu(), on_cpu)
    rows = [random_logits(i, vocab=129280).cuda() for i in range(20)]
    first, again = Sampler(params), Sampler(params)
    assert [first.sample(r) for r in rows] == [again.sample(r) for r in rows]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("seed", "x"), ("seed", 1.5),
])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_from_generation_config():
    config = {"temperature": 0.6, "top_p": 0.95, "do_sample": True, "eos_token_id": 1}
    params = SamplingParams.from_generation_config(config, top_k=None, seed=3)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.6, 0.95, 0, 3)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6}).greedy
    assert SamplingParams.from_generation_config(None, temperature=0.0).greedy
