"""The shipped demo model answers arithmetic: accuracy per GGUF file x backend x path on held-out questions.

The demo model (ktransformers/demo/model) was trained with transformers' DeepseekV3ForCausalLM and
exported with our own GGUF writer (ktransformers/tools/demo_model). Held-out questions come with
client-style context (system prompts, earlier turns, noise); training never saw their (op, a, b).

- exact greedy (every file x torch / cpu_quant, 240 questions): one forward over prompt + expected
  reply; right when every reply position's argmax is the expected token, i.e. greedy decoding writes
  the reply token for token. A kernel or dequantization bug that keeps logits close but flips one
  argmax anywhere in the working fails a question.
- prefill_and_generate directly and the real server (`chat_openai.py --demo`) with the `openai` SDK
  on two disjoint halves of the held-out set (q4_k_m, the CPU default placement): `content` must hold
  the result and `reasoning_content` the working.
- with CUDA, the hybrid placement (GPU attention + cpu_quant experts, the default rules) on every file.

KT_DEMO_GENERATE_N (default 100 per generation path, 200 in all) sets how many questions each generation test runs.
"""

import os

import openai
import pytest
import torch

from ktransformers.demo import VARIANTS, demo_model_name, demo_paths
from ktransformers.models.loader import load_model
from ktransformers.server.testing import chat_openai_process
from ktransformers.tools.demo_model.evaluate import (check_reply, exact_greedy_accuracy, generate_accuracy,
                                                      rules_file)
from ktransformers.tools.demo_model.task import held_out_cases, held_out_problems, parse_answer

N_HELD_OUT = 240
GENERATE_N = int(os.environ.get("KT_DEMO_GENERATE_N", "100"))
THRESHOLD = {"bf16": 0.97, "q8_0": 0.95, "q4_k_m": 0.95, "iq1_s": 0.95}
CASES = held_out_cases(N_HELD_OUT)
_loaded = {}


def loaded_demo(variant: str, backend: str, tmp_path_factory):
    key = (variant, backend)
    if key not in _loaded:
        model_dir, gguf_path = demo_paths(variant)
        rules = rules_file(backend, tmp_path_factory.mktemp("rules"))
        _loaded[key] = load_model(gguf_path, model_dir, rules, max_context=4096)
    return _loaded[key]


def test_shipped_files_and_api():
    sizes = {}
    for variant in VARIANTS:
        model_dir, gguf_path = demo_paths(variant)
        assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
        sizes[variant] = gguf_path.stat().st_size
    assert sum(sizes.values()) < 21e6, sizes
    assert demo_paths("f32") == demo_paths("bf16") and demo_paths("ud-iq1_s") == demo_paths("iq1_s")
    assert demo_model_name() == "ktransformers-demo-q4_k_m"
    with pytest.raises(ValueError):
        demo_paths("q2_k")


def test_held_out_questions_are_unseen_and_many():
    problems = held_out_problems(N_HELD_OUT)
    assert len({p.key() for p in problems}) == N_HELD_OUT >= 200
    assert {p.op for p in problems} == {"add", "sub", "mul"}


def test_export_matches_transformers(tmp_path):
    """Our loader on the bf16 reference vs transformers' DeepseekV3 on the same file (read by the gguf package)."""
    from test_model_vs_hf import compare_with_hf, hf_model

    model_dir, gguf_path = demo_paths("bf16")
    loaded = load_model(gguf_path, model_dir, rules_file("torch", tmp_path), max_context=64)
    compare_with_hf(loaded.model, hf_model(model_dir, gguf_path), loaded.config.vocab_size)


@pytest.mark.parametrize("backend", ["torch", "cpu_quant"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exact_greedy_accuracy(variant, backend, tmp_path_factory):
    loaded = loaded_demo(variant, backend, tmp_path_factory)
    accuracy, failures = exact_greedy_accuracy(loaded, CASES)
    print(f"\n{variant}/{backend}: exact greedy {accuracy:.4f} on {len(CASES)}")
    assert accuracy >= THRESHOLD[variant], f"{variant}/{backend}: {accuracy:.3f} on {len(CASES)}; {failures[:5]}"


def test_a_broken_dequantization_fails_the_accuracy_check(monkeypatch, tmp_path):
    """The check can fail: Q4_K/Q5_K scales 4-7 without their top two bits (a plausible unpacking bug)."""
    from ktransformers.gguf.dequant import kquants

    unpack = kquants._scales_and_mins

    def broken(packed):
        scales, mins = unpack(packed)
        return torch.cat((scales[..., :4], scales[..., 4:] & 0x0F), dim=-1), mins

    monkeypatch.setattr(kquants, "_scales_and_mins", broken)
    model_dir, gguf_path = demo_paths("q4_k_m")
    loaded = load_model(gguf_path, model_dir, rules_file("torch", tmp_path), max_context=4096)
    accuracy, _ = exact_greedy_accuracy(loaded, CASES[:60])
    assert accuracy < THRESHOLD["q4_k_m"]


def test_prefill_and_generate_answers(tmp_path_factory):
    """Greedy generation through prefill_and_generate: reasoning holds the working, content the result."""
    loaded = loaded_demo("q4_k_m", "cpu_quant", tmp_path_factory)
    cases = CASES[:GENERATE_N]
    accuracy, failures = generate_accuracy(loaded, cases)
    print(f"\nq4_k_m/cpu_quant prefill_and_generate: {accuracy:.4f} on {len(cases)}")
    assert accuracy >= THRESHOLD["q4_k_m"], f"{accuracy:.3f} on {len(cases)}; {failures[:3]}"


@pytest.fixture(scope="module")
def demo_server():
    """`python chat_openai.py --demo` (q4_k_m, default placement) on a free port."""
    with chat_openai_process("--demo") as (port, _):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, messages, stream: bool) -> tuple[str, str]:
    """(reasoning_content, content) of a greedy chat completion."""
    if not stream:
        message = client.chat.completions.create(model="anything", messages=messages, temperature=0,
                                                 max_tokens=200).choices[0].message
        return message.model_extra.get("reasoning_content") or "", message.content or ""
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="anything", messages=messages, temperature=0,
                                                max_tokens=200, stream=True):
        if chunk.choices:
            reasoning += chunk.choices[0].delta.model_extra.get("reasoning_content") or ""
            content += chunk.choices[0].delta.content or ""
    return reasoning, content


def test_server_answers_with_openai_sdk(demo_server):
    assert [m.id for m in demo_server.models.list().data] == ["ktransformers-demo-q4_k_m"]
    cases = CASES[N_HELD_OUT - GENERATE_N:]  # the other half of the held-out set
    wrong = []
    for i, (problem, messages) in enumerate(cases):
        reasoning, content = ask(demo_server, messages, stream=bool(i % 2))
        if not check_reply(problem, reasoning, content):
            wrong.append((problem, reasoning[-60:], content))
    print(f"\nq4_k_m server + openai SDK: {1 - len(wrong) / len(cases):.4f} on {len(cases)}")
    assert 1 - len(wrong) / len(cases) >= THRESHOLD["q4_k_m"], f"{len(wrong)} of {len(cases)} wrong: {wrong[:3]}"


def test_readme_question(demo_server):
    reasoning, content = ask(demo_server, [{"role": "user", "content": "What is 4821 plus 367?"}], stream=True)
    assert "1+7+0=8" in reasoning and "5188" in reasoning
    assert content.strip() == "4821 + 367 = 5188" and parse_answer(content) == 5188


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the hybrid placement needs CUDA")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hybrid_gpu_accuracy(variant):
    """Default rules with CUDA: attention, shared experts and dense layers on the GPU, routed experts cpu_quant."""
    model_dir, gguf_path = demo_paths(variant)
    loaded = load_model(gguf_path, model_dir, None, max_context=4096)
    accuracy, failures = exact_greedy_accuracy(loaded, CASES)
    assert accuracy >= THRESHOLD[variant], f"{variant}/hybrid exact: {accuracy:.3f}; {failures[:5]}"
    generated, wrong = generate_accuracy(loaded, CASES[:GENERATE_N])
    assert generated >= THRESHOLD[variant], f"{variant}/hybrid generate: {generated:.3f}; {wrong[:3]}"
