"""The real backend (model_generate_fn + prefill_and_generate) behind the server, with the tiny
model's real tokenizer and a model that answers a chosen token sequence: exactly what the real
`openai` and `ollama` clients receive when the model emits control tokens."""

import ollama
import openai
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from ktransformers.models.loader import LoadedModel
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.wsgi import BackgroundServer

# What the model "says": reasoning and answer with control tokens in between, then end of sentence.
SAID = "<think>Let me think<｜Assistant｜></think>The answer<｜User｜><｜tool▁sep｜> is 42<｜end▁of▁sentence｜>"
USER = [{"role": "user", "content": "What is six times seven?"}]


class SaysScript:
    """A model whose logits make any sampler pick script[i] as the i-th answer token."""

    def __init__(self, script: list[int], vocab_size: int, max_context: int = 256):
        self.script, self.vocab_size, self.max_context = script, vocab_size, max_context
        self.prompt_len = 0

    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        if start_pos == 0:
            self.prompt_len = input_ids.shape[1]          # the prompt is short: one prefill chunk
        answered = start_pos + input_ids.shape[1] - self.prompt_len
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.script[min(answered, len(self.script) - 1)]] = 100.0
        return logits


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def url(tiny_model_dir, tokenizer):
    script = tokenizer.encode(SAID, add_special_tokens=False)
    model = SaysScript(script, len(tokenizer))
    loaded = LoadedModel(model, tokenizer, None, GenerationConfig.from_pretrained(tiny_model_dir))
    engine = Engine(model_generate_fn(loaded), queue_size=2)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="tiny", max_new_tokens=50))) as base:
        yield base
    engine.stop()


@pytest.fixture(scope="module")
def expected(tokenizer):
    """The oracle: Hugging Face's own decode without special tokens, split at the think tags."""
    ids = tokenizer.encode(SAID, add_special_tokens=False)
    shown = tokenizer.decode(ids, skip_special_tokens=True)
    assert shown == "<think>Let me think</think>The answer is 42"
    reasoning, content = shown.removeprefix("<think>").split("</think>")
    return shown, reasoning, content


def specials_in(text: str, tokenizer) -> list[str]:
    return [token for token in tokenizer.all_special_tokens + ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>"]
            if token in text]


def test_openai_stream_has_no_control_tokens_and_no_empty_chunks(url, expected, tokenizer):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    for chunk, delta in zip(chunks[1:], deltas[1:]):
        reasoning = delta.model_extra.get("reasoning_content")
        if chunk.choices[0].finish_reason is None:    # every chunk but the last carries new text
            assert (delta.content or reasoning) and delta.content != "" and reasoning != "", chunk
        for text in (delta.content or "", reasoning or ""):
            assert specials_in(text, tokenizer) == []
    _, want_reasoning, want_content = expected
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == want_reasoning
    assert "".join(d.content or "" for d in deltas) == want_content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_non_stream_think_tags_and_raw_completions(url, expected):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    shown, _, _ = expected
    reply = client.chat.completions.create(model="tiny", messages=USER, temperature=0,
                                           extra_body={"reasoning_format": "think_tags"})
    assert reply.choices[0].message.content == shown
    streamed = client.completions.create(model="tiny", prompt="Six times seven", temperature=0, stream=True)
    texts = [c.choices[0].text for c in streamed]
    assert "".join(texts) == shown and all(texts[:-1])      # only the finish chunk has no text


def test_ollama_stream_has_no_control_tokens(url, expected, tokenizer):
    parts = list(ollama.Client(host=url, timeout=30).chat(model="tiny", messages=USER, stream=True,
                                                          options={"temperature": 0}))
    _, want_reasoning, want_content = expected
    assert "".join(p.message.thinking or "" for p in parts) == want_reasoning
    assert "".join(p.message.content for p in parts) == want_content
    assert all(p.message.thinking or p.message.content for p in parts[:-1])
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert not any(specials_in((p.message.thinking or "") + p.message.content, tokenizer) for p in parts)
