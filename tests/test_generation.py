"""prefill_and_generate with a scripted model and a real byte-level BPE tokenizer."""

import gc

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ktransformers.util.events import ContextLengthError, FinishEvent, TokenEvent
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.utils import prefill_and_generate

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on English, so CJK and emoji take several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[BOS, EOS, "<｜User｜>", "<｜Assistant｜>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. hello world, "
                             "this is a test of streaming text. the answer is"] * 20, trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


class ScriptedModel:
    """Follows the model contract; its logits force `script` after a prompt of `prompt_len`.

    It checks that positions are contiguous (the static cache contract) and records calls.
    """

    def __init__(self, prompt_len, script, vocab_size, max_context=4096, noise_seed=None,
                 device="cpu"):
        self.prompt_len, self.script, self.device = prompt_len, list(script), device
        self.vocab_size, self.max_context = vocab_size, max_context
        self.calls = []  # (start_pos, token ids)
        self.next_pos = 0
        self.noise = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None

    def __call__(self, input_ids, start_pos):
        assert input_ids.dtype == torch.long and input_ids.shape[0] == 1
        if start_pos == 0:
            self.next_pos = 0
        assert start_pos == self.next_pos, f"non-contiguous position {start_pos}, expected {self.next_pos}"
        length = input_ids.shape[1]
        assert start_pos + length <= self.max_context, "wrote past the static cache"
        self.next_pos = start_pos + length
        self.calls.append((start_pos, input_ids[0].tolist()))
        logits = torch.zeros(1, length, self.vocab_size)
        if self.noise is not None:  # a spread-out distribution for sampling tests
            logits[0, -1] = torch.randn(self.vocab_size, generator=self.noise)
        step = start_pos + length - self.prompt_len
        if 0 <= step < len(self.script) and self.noise is None:
            logits[0, -1, self.script[step]] = 30.0
        return logits.to(self.device)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def make(tokenizer, prompt_text, answer_text, eos=True, **kw):
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    answer = tokenizer.encode(answer_text, add_special_tokens=False)
    script = answer + ([tokenizer.eos_token_id] if eos else [])
    return prompt, answer, ScriptedModel(len(prompt), script, len(tokenizer), **kw)


def run(*args, **kw):
    events = list(prefill_and_generate(*args, **kw))
    tokens, finish = events[:-1], events[-1]
    assert isinstance(finish, FinishEvent) and all(isinstance(e, TokenEvent) for e in tokens)
    return tokens, finish


def joined(events, field="text"):
    return "".join(getattr(e, field) for e in events)


def test_streams_chinese_and_emoji_exactly_then_stops_at_eos(tokenizer):
    answer_text = "你好, 世界! 🙂👍 the end"
    prompt, answer, model = make(tokenizer, "hello world", answer_text)
    tokens, finish = run(model, tokenizer, torch.tensor([prompt]), max_new_tokens=100)
    assert [e.token_id for e in tokens] == answer
    assert joined(tokens) == tokenizer.decode(answer) == answer_text
    assert joined(tokens, "content") == answer_text and joined(tokens, "reasoning") == ""
    assert all("\ufffd" not in e.text for e in tokens)
    assert sum(e.text == "" for e in tokens) >= 8  # partial characters were held back
    assert finish.finish_reason == "stop"
    assert (finish.prompt_tokens, finish.completion_tokens) == (len(prompt), len(answer))


def test_length_finish_flushes_a_cut_character(tokenizer):
    prompt, answer, model = make(tokenizer, "hello", "ab世界")
    n = len(tokenizer.encode("ab", add_special_tokens=False)) + 1  # ends inside 世
    tokens, finish = run(model, tokenizer, prompt, max_new_tokens=n)
    assert finish.finish_reason == "length" and finish.completion_tokens == n
    assert joined(tokens) == tokenizer.decode(answer[:n]) and joined(tokens).endswith("\ufffd")


def test_eos_after_a_cut_character_releases_it_in_a_last_event(tokenizer):
    prompt = tokenizer.encode("hello", add_special_tokens=False)
    answer = tokenizer.encode("a世", add_special_tokens=False)[:-1]  # 世 missing a byte
    model = ScriptedModel(len(prompt), answer + [tokenizer.eos_token_id], len(tokenizer))
    tokens, finish = run(model, tokenizer, prompt)
    assert tokens[-1].token_id is None
    assert [e.token_id for e in tokens[:-1]] == answer
    assert joined(tokens) == tokenizer.decode(answer) and finish.completion_tokens == len(answer)


def test_prefill_is_chunked_and_decode_positions_follow(tokenizer):
    prompt, answer, model = make(tokenizer, "the quick brown fox jumps over the lazy dog", "ok!")
    assert len(prompt) > 8
    run(model, tokenizer, prompt, chunk_size=4)
    prefill = [(0, prompt[0:4]), (4, prompt[4:8])]
    assert model.calls[:2] == prefill
    starts = [c[0] for c in model.calls]
    n_prefill = -(-len(prompt) // 4)
    assert starts[:n_prefill] == list(range(0, len(prompt), 4))
    # each decode step feeds back the previous token at the next position
    decode = model.calls[n_prefill:]
    assert decode == [(len(prompt) + i, [answer[i]]) for i in range(len(answer))]


def test_stop_string_split_across_tokens_is_never_yielded(tokenizer):
    prompt, answer, model = make(tokenizer, "hi", "the answer is 42###END### and more text")
    tokens, finish = run(model, tokenizer, prompt, stop=["###END###"])
    assert joined(tokens) == "the answer is 42"
    assert finish.finish_reason == "stop"
    # generation stopped at the token completing the stop string
    n = next(i for i in range(len(answer)) if "###END###" in tokenizer.decode(answer[:i + 1])) + 1
    assert finish.completion_tokens == n
    assert len(model.calls) == 1 + n - 1


def test_partial_stop_prefix_is_released_at_the_end(tokenizer):
    prompt, answer, model = make(tokenizer, "hi", "value ##")
    tokens, finish = run(model, tokenizer, prompt, stop="###")
    assert joined(tokens) == "value ##" and finish.finish_reason == "stop"
    assert tokens[-1].token_id is None and tokens[-1].text == "##"


def test_prompt_too_long_fails_before_any_compute(tokenizer):
    prompt, _, model = make(tokenizer, "the quick brown fox", "x", max_context=4)
    with pytest.raises(ContextLengthError, match=rf"{len(prompt)} tokens.*context window is 4") as err:
        prefill_and_generate(model, tokenizer, prompt)
    assert isinstance(err.value, ValueError) and model.calls == []


def test_generation_stops_with_length_at_the_end_of_the_context(tokenizer):
    prompt, answer, model = make(tokenizer, "hello", "the quick brown fox jumps over the lazy dog")
    model.max_context = len(prompt) + 3
    tokens, finish = run(model, tokenizer, prompt, max_new_tokens=100)
    assert finish.finish_reason == "length" and finish.completion_tokens == 3
    assert [e.token_id for e in tokens] == answer[:3]


@pytest.mark.parametrize("bad", [dict(inputs=[]), dict(inputs="text"), dict(max_new_tokens=0),
                                 dict(chunk_size=0), dict(inputs=torch.zeros(1, 3))])
def test_bad_arguments_are_rejected(tokenizer, bad):
    prompt, _, model = make(tokenizer, "hello", "x")
    kw = dict(inputs=prompt) | bad
    with pytest.raises(ValueError):
        prefill_and_generate(model, tokenizer, kw.pop("inputs"), **kw)
    assert model.calls == []


@pytest.mark.parametrize("how", ["close", "drop"])
def test_closing_the_generator_stops_the_model_at_once(tokenizer, how):
    prompt, _, model = make(tokenizer, "hello", "the quick brown fox jumps over the lazy dog")
    gen = prefill_and_generate(model, tokenizer, prompt, max_new_tokens=50)
    assert model.calls == []  # nothing runs before the consumer asks
    next(gen), next(gen)
    calls = len(model.calls)
    if how == "close":
        gen.close()
        with pytest.raises(StopIteration):
            next(gen)
    else:
        del gen
        gc.collect()
    assert len(model.calls) == calls


def test_forced_think_splits_reasoning_and_content(tokenizer):
    prompt, _, model = make(tokenizer, "hello <think>\n", "hmm, 世界?</think>\n\nthe answer")
    tokens, _ = run(model, tokenizer, prompt, force_think=True)
    assert joined(tokens, "reasoning") == "hmm, 世界?"
    assert joined(tokens, "content") == "\n\nthe answer"
    assert joined(tokens) == "hmm, 世界?</think>\n\nthe answer"
    # the tag's own step shows it in `text` but in neither split field
    tag = next(e for e in tokens if e.token_id == tokenizer.convert_tokens_to_ids("</think>"))
    assert (tag.text, tag.reasoning, tag.content) == ("</think>", "", "")


def test_prompt_ending_in_think_starts_in_reasoning(tokenizer):
    prompt, _, model = make(tokenizer, "hello<think>\n", "step</think>done")
    tokens, _ = run(model, tokenizer, prompt)
    assert (joined(tokens, "reasoning"), joined(tokens, "content")) == ("step", "done")


def test_generated_think_opens_reasoning(tokenizer):
    prompt, _, model = make(tokenizer, "hello", "<think>\nfox</think>dog")
    tokens, _ = run(model, tokenizer, prompt)
    assert (joined(tokens, "reasoning"), joined(tokens, "content")) == ("\nfox", "dog")


def test_eos_ids_come_from_the_generation_config(tokenizer):
    prompt, answer, model = make(tokenizer, "hello", "the quick brown fox", eos=False)
    stop_id = answer[2]
    _, finish = run(model, tokenizer, prompt, generation_config={"eos_token_id": [7777, stop_id]})
    assert finish.finish_reason == "stop" and finish.completion_tokens == 2
    model.generation_config = type("GC", (), {"eos_token_id": stop_id})()
    _, finish = run(model, tokenizer, prompt)
    assert finish.completion_tokens == 2
    _, finish = run(model, tokenizer, prompt, eos_token_ids=[answer[1]])
    assert finish.completion_tokens == 1


def test_seeded_sampling_is_reproducible(tokenizer):
    def sample(seed):
        prompt, _, model = make(tokenizer, "hello", "", eos=False, noise_seed=1)
        torch.manual_seed(seed + 123)  # the global RNG must not matter
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
        tokens, _ = run(model, tokenizer, prompt, max_new_tokens=20, sampling=params, eos_token_ids=[])
        return [e.token_id for e in tokens]

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logits_on_cuda(tokenizer):
    prompt, answer, model = make(tokenizer, "hello", "the 世界 answer", device="cuda")
    params = SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=1.05, seed=1)
    tokens, finish = run(model, tokenizer, prompt, sampling=params)
    assert [e.token_id for e in tokens] == answer and finish.finish_reason == "stop"


def test_finish_reports_timings(tokenizer):
    prompt, answer, model = make(tokenizer, "hello world", "the quick brown fox")
    _, finish = run(model, tokenizer, prompt)
    assert finish.prefill_seconds > 0 and finish.decode_seconds > 0
    assert finish.prefill_tokens_per_s == pytest.approx(len(prompt) / finish.prefill_seconds)
    # decode steps: one forward per token after the first, the last one producing EOS
    assert finish.decode_tokens_per_s == pytest.approx(len(answer) / finish.decode_seconds)


# --- the real tiny DeepSeek-V3 model and its R1 tokenizer (tests/conftest.py) ---

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ktransformers.models.loader import load_model

    return load_model(tiny_model_dir / "model.gguf", tiny_model_dir, max_context=48)


def test_real_tokenizer_streams_chinese_and_emoji_exactly(tiny):
    tok = tiny.tokenizer
    answer_text = "<think>想一想 🙂</think>\n\n答案是 42 👍"
    prompt, answer, model = make(tok, "hi", answer_text)
    assert len(answer) > len(tok.encode(answer_text.replace("🙂", "").replace("👍", ""),
                                        add_special_tokens=False))  # emoji take 2+ tokens
    tokens, finish = run(model, tok, prompt)
    assert joined(tokens) == tok.decode(answer) == answer_text
    assert (joined(tokens, "reasoning"), joined(tokens, "content")) == ("想一想 🙂", "\n\n答案是 42 👍")
    assert all("\ufffd" not in e.text for e in tokens) and finish.finish_reason == "stop"


def test_greedy_generation_matches_recomputing_the_whole_sequence(tiny):
    """Oracle: without any cache reuse, argmax of a full forward over prompt + answer so far."""
    prompt = tiny.tokenizer.encode("hello 你好, the answer is", add_special_tokens=False)
    events = list(prefill_and_generate(tiny.model, tiny.tokenizer, prompt, max_new_tokens=4,
                                       chunk_size=3, eos_token_ids=[]))
    generated = [e.token_id for e in events[:-1]]
    assert len(generated) == 4 and events[-1].finish_reason == "length"
    for k, token in enumerate(generated):
        with torch.inference_mode():
            logits = tiny.model(torch.tensor([prompt + generated[:k]]), 0)[0, -1]
        assert int(logits.argmax()) == token, k


def test_real_model_stops_at_the_end_of_its_context(tiny):
    prompt = tiny.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 4,
                                   add_special_tokens=False)[:45]
    tokens, finish = run(tiny.model, tiny.tokenizer, prompt, max_new_tokens=100, eos_token_ids=[])
    assert finish.finish_reason == "length" and finish.completion_tokens == 48 - 45 == len(tokens)
    with pytest.raises(ContextLengthError, match="48"):
        prefill_and_generate(tiny.model, tiny.tokenizer, prompt + [5, 5, 5])
