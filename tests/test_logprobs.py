"""prefill_and_generate(top_logprobs=n): one log-probability per generated token, the model's own
(log-softmax of the raw logits, whatever the sampling settings), checked against an independent teacher-
forced forward pass over prompt + answer, on the tiny random model (whose answers split characters
over tokens, so the detokenizer holds text back while each token still gets its entry)."""

import math

import pytest
import torch

from ktransformers.models.loader import load_model
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent
from ktransformers.util.logprobs import LogprobReporter, TokenBytes
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.utils import prefill_and_generate


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir / "model.gguf", model_path=tiny_model_dir, max_context=96)


def prompt(loaded):
    return build_prompt_ids(loaded.tokenizer, [{"role": "user", "content": "Tell me a story"}])


def teacher_forced(model, prompt_ids, answer_ids) -> torch.Tensor:
    """log_softmax over the whole sequence in one forward: row i is the distribution of answer token i."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + answer_ids]), 0)[0]
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(answer_ids)]
    return torch.log_softmax(rows.float(), dim=-1)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0),
                                      SamplingParams(temperature=1.7, top_k=40, repetition_penalty=1.3, seed=3)])
def test_each_token_gets_the_models_own_logprob(loaded, sampling):
    ids = prompt(loaded)
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, ids, 40, sampling=sampling, top_logprobs=5))
    finish = events[-1]
    tokens = [e for e in events if not isinstance(e, FinishEvent) and e.token_id is not None]
    assert len(tokens) == finish.completion_tokens == 40
    assert all(e.logprob is not None and e.logprob.token_id == e.token_id for e in tokens)
    answer = [e.token_id for e in tokens]
    oracle = teacher_forced(loaded.model, ids, answer)
    ours = torch.tensor([e.logprob.logprob for e in tokens])
    assert torch.allclose(ours, oracle[torch.arange(len(answer)), answer], atol=1e-4)
    assert math.isclose(float(ours.sum()), float(oracle[torch.arange(len(answer)), answer].sum()), abs_tol=1e-3)
    for row, e in zip(oracle, tokens):
        best = torch.topk(row, 5)
        assert [t.token_id for t in e.logprob.top] == best.indices.tolist()
        assert torch.allclose(torch.tensor([t.logprob for t in e.logprob.top]), best.values, atol=1e-4)
    if sampling.greedy:
        assert all(e.logprob.top[0].token_id == e.token_id for e in tokens)
    else:   # sampled at temperature 1.7 with penalties, yet reported from the raw distribution
        assert any(e.logprob.top[0].token_id != e.token_id for e in tokens)


def test_bytes_rebuild_the_text_held_back_by_the_detokenizer(loaded):
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, prompt(loaded), 60, hide_control_tokens=False,
                                       top_logprobs=0))
    tokens = [e for e in events[:-1] if e.token_id is not None]
    assert any(e.text == "" for e in tokens), "the random model should split a character over tokens"
    joined = b"".join(e.logprob.bytes for e in tokens)
    assert joined.decode("utf-8", errors="replace") == "".join(e.text for e in events[:-1])
    assert joined.decode("utf-8", errors="replace") == loaded.tokenizer.decode(
        [e.token_id for e in tokens], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert all(e.logprob.top == () for e in tokens)


def test_token_bytes_of_special_and_byte_tokens(loaded):
    tokenizer = loaded.tokenizer
    token_bytes = TokenBytes(tokenizer)
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert token_bytes(think) == b"<think>"
    for text in ("é", "日本", " hello"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(token_bytes(i) for i in ids) == text.encode()
    assert token_bytes(len(tokenizer) + 5) == b""     # an output-layer padding row


def test_nothing_is_computed_unless_asked(loaded, monkeypatch):
    def refuse(*args):
        raise AssertionError("log-probabilities computed without being asked")
    monkeypatch.setattr(LogprobReporter, "entry", refuse)
    events = list(prefill_and_generate(loaded.model, loaded.tokenizer, prompt(loaded), 5))
    assert all(getattr(e, "logprob", None) is None for e in events)


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True])
def test_bad_top_logprobs_is_refused_before_any_model_call(loaded, bad):
    with pytest.raises(ValueError, match="top_logprobs"):
        prefill_and_generate(loaded.model, loaded.tokenizer, prompt(loaded), 5, top_logprobs=bad)
