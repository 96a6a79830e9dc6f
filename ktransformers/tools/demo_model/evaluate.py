"""Accuracy of a demo GGUF on the held-out questions, through our loader and prefill_and_generate.

    python -m ktransformers.tools.demo_model.evaluate [--variant q4_k_m] [--rules torch|cpu_quant|default] [-n 240]

Two measures:
- `generate_accuracy`: greedy generation with prefill_and_generate; a case is right when
  `content` holds the right result and `reasoning` holds the scratchpad's working.
- `exact_greedy_accuracy`: one forward pass over prompt + expected reply; a case is right when
  the argmax at every reply position is the expected next token. Greedy decoding then writes the
  expected reply token for token, so this is a lower bound of generate_accuracy that needs one
  prefill per question instead of a decode step per token (CI runs it on every file x backend).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .task import Problem, held_out_cases, parse_answer, reply, scratchpad

TORCH_RULES = "- match: {name: '.*'}\n  replace: {backend: torch, device: cpu, dtype: float32}\n"
CPU_QUANT_RULES = "- match: {name: '.*'}\n  replace: {backend: cpu_quant, device: cpu, dtype: float32}\n"
RULES = {"torch": TORCH_RULES, "cpu_quant": CPU_QUANT_RULES}


def rules_file(backend: str, directory) -> str | None:
    """A rules YAML path for 'torch' / 'cpu_quant' (all on the CPU), None for the default placement."""
    if backend == "default":
        return None
    path = directory / f"demo-{backend}.yaml"
    path.write_text(RULES[backend])
    return str(path)


def check_reply(problem: Problem, reasoning: str, content: str) -> bool:
    """content carries the right result and reasoning the working (the header and the last line)."""
    lines = scratchpad(problem).splitlines()
    return (parse_answer(content) == problem.result and lines[0] in reasoning and lines[-1] in reasoning
            and "</think>" not in content)


def generate_one(loaded, messages, max_new_tokens: int = 160) -> tuple[str, str]:
    from ktransformers.util.chat import build_prompt_ids
    from ktransformers.util.events import TokenEvent
    from ktransformers.util.utils import prefill_and_generate

    ids = build_prompt_ids(loaded.tokenizer, messages)
    reasoning, content = [], []
    for event in prefill_and_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=max_new_tokens):
        if isinstance(event, TokenEvent):
            reasoning.append(event.reasoning or "")
            content.append(event.content or "")
    return "".join(reasoning), "".join(content)


def generate_accuracy(loaded, cases) -> tuple[float, list]:
    failures = []
    for problem, messages in cases:
        reasoning, content = generate_one(loaded, messages)
        if not check_reply(problem, reasoning, content):
            failures.append((problem, reasoning, content))
    return 1 - len(failures) / len(cases), failures


def exact_greedy_accuracy(loaded, cases) -> tuple[float, list]:
    from ktransformers.util.chat import build_prompt_ids

    tokenizer, failures = loaded.tokenizer, []
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for problem, messages in cases:
            prompt = build_prompt_ids(tokenizer, messages)
            target = tokenizer.encode(reply(problem), add_special_tokens=False) + [eos]
            ids = torch.tensor([prompt + target])
            logits = loaded.model(ids[:, :-1], 0)[0, len(prompt) - 1:].cpu()
            if not torch.equal(logits.argmax(-1), ids[0, len(prompt):]):
                failures.append(problem)
    return 1 - len(failures) / len(cases), failures


def main(argv=None):
    import tempfile
    from pathlib import Path

    from ktransformers.demo import demo_paths
    from ktransformers.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="q4_k_m")
    p.add_argument("--rules", default="torch", choices=["torch", "cpu_quant", "default"])
    p.add_argument("-n", type=int, default=240)
    p.add_argument("--mode", default="both", choices=["exact", "generate", "both"])
    p.add_argument("--generate-n", type=int, default=None, help="generate for the first N questions only")
    a = p.parse_args(argv)
    model_dir, gguf_path = demo_paths(a.variant)
    rules = rules_file(a.rules, Path(tempfile.mkdtemp()))
    loaded = load_model(gguf_path, model_dir, rules, max_context=4096)
    result_device = {"cuda": torch.cuda.is_available()}
    cases = held_out_cases(a.n)
    result = {"variant": a.variant, "rules": a.rules, "questions": len(cases), **result_device}
    if a.mode in ("exact", "both"):
        start = time.time()
        result["exact_greedy"], failures = exact_greedy_accuracy(loaded, cases)
        result["exact_seconds"] = round(time.time() - start, 1)
    if a.mode in ("generate", "both"):
        start = time.time()
        generated = cases[:a.generate_n or len(cases)]
        result["generate"], failures = generate_accuracy(loaded, generated)
        result["generate_questions"] = len(generated)
        result["generate_seconds"] = round(time.time() - start, 1)
        for problem, reasoning, content in failures[:3]:
            print("FAIL", problem, repr(reasoning[-80:]), repr(content))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
