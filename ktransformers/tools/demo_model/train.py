"""Train the demo model with Hugging Face transformers' DeepseekV3ForCausalLM (not our implementation).

    python -m ktransformers.tools.demo_model.train --out DIR --steps 1510 [--device cuda] [--seed 0] [--workers 10]

The shipped model is `--steps 1510 --workers 10` on one H200 (162 s; see ktransformers/demo/model/
train_log.json). `--steps 0` picks the step count that fills `--time-budget` seconds. A CPU runs it
too, in hours instead of minutes. Then `python -m ktransformers.tools.demo_model.build --train-dir DIR`.

Writes DIR/config.json, generation_config.json, tokenizer.json, tokenizer_config.json and the
trained float32 weights (HF parameter names) as DIR/weights-*.pt, in two parts that each stay
under 16 MB. Seeded: the data stream comes from `random.Random(seed, worker)` and torch is
seeded, so a run on the same device and software repeats (up to GPU reduction order).
The loss covers only the final assistant reply: `<think>` scratchpad `</think>` answer, eos.
Aux-loss-free load balancing as in DeepSeek-V3: after each step the router's
`e_score_correction_bias` moves by `--bias-rate` toward under-used experts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from ..tiny_config import make_generation_config
from ..tiny_tokenizer import BOS, EOS
from .config import demo_config
from .task import held_out_cases, held_out_problems, make_messages, random_problem, reply
from .tokenizer import build_demo_tokenizer, render_chat

MAX_LEN = 1024
PROBE = 60


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def encode_case(tokenizer, messages, answer: str) -> tuple[list[int], int]:
    """(ids, index of the first reply token): bos + chat prompt + reply + eos."""
    prompt = tokenizer.encode(render_chat(messages), add_special_tokens=False).ids
    target = tokenizer.encode(answer, add_special_tokens=False).ids + [tokenizer.token_to_id(EOS)]
    return prompt + target, len(prompt)


class Stream(torch.utils.data.IterableDataset):
    """Endless batches; even batches short chats (many rows), odd ones long client contexts."""

    def __init__(self, tokenizer_json: str, seed: int, short_batch: int, long_batch: int):
        self.tokenizer_json, self.seed = tokenizer_json, seed
        self.short_batch, self.long_batch = short_batch, long_batch

    def __iter__(self):
        from tokenizers import Tokenizer

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        rng = random.Random(f"{self.seed}-{worker}")
        excluded = {p.key() for p in held_out_problems()}
        step = 0
        while True:
            long_context = step % 2 == 1
            rows = []
            while len(rows) < (self.long_batch if long_context else self.short_batch):
                problem = random_problem(rng)
                if problem.key() in excluded:
                    continue
                ids, start = encode_case(tokenizer, make_messages(problem, rng, long_context), reply(problem))
                if len(ids) <= MAX_LEN:
                    rows.append((ids, start))
            yield collate(rows)
            step += 1


def collate(rows):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
        mask[i, :len(ids)] = 1
    return input_ids, labels, mask


def exact_accuracy(model, tokenizer, cases, device, batch=64) -> float:
    """Share of cases whose whole reply is the argmax at every step: greedy decoding would write it exactly."""
    model.eval()
    rows = [encode_case(tokenizer, messages, reply(p)) for p, messages in cases]
    good = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(rows), batch):
            input_ids, labels, mask = (t.to(device) for t in collate(rows[i:i + batch]))
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            predicted = logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            wrong = ((predicted != target) & (target != -100)).any(-1)
            good += int((~wrong).sum())
    model.train()
    return good / len(rows)


def build_model(config: dict, seed: int):
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.DeepseekV3Config(**config)
    return transformers.DeepseekV3ForCausalLM(hf_config)


def routers(model):
    return [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


def train(out: Path, steps: int, seed: int, device: str, lr: float, short_batch: int, long_batch: int,
          workers: int, bias_rate: float, time_budget: float | None, eval_every: int) -> dict:
    random.seed(seed)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_demo_tokenizer()
    config = demo_config(tok.vocab_size, tok.token_id(BOS), tok.token_id(EOS))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", make_generation_config(config))
    tok.save(out, model_max_length=config["max_position_embeddings"])

    dev = torch.device(device)
    model = build_model(config, seed).to(dev).train()
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    loads = []
    for router in routers(model):
        router.register_forward_hook(lambda module, args, output: loads.append((module, output[2].detach())))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "gate.weight" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "gate.weight" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-8)
    # steps == 0: time the first PROBE steps and pick the step count that fills `time_budget`
    # (the log records it; pass it as --steps to repeat the run)
    total = {"steps": steps or 10 ** 9}
    warmup = min(300, (steps or 10 ** 9) // 5)

    def lr_factor(s):
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total["steps"] - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data = torch.utils.data.DataLoader(Stream(tok.tokenizer.to_str(), seed, short_batch, long_batch),
                                       batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    eval_cases = held_out_cases()
    start, log = time.time(), {"steps": 0}
    for step, (input_ids, labels, mask) in enumerate(data):
        if step == PROBE and not steps:
            total["steps"] = int(time_budget / ((time.time() - start) / PROBE))
            print(f"{PROBE} steps took {time.time() - start:.1f}s: training {total['steps']} steps", flush=True)
        if step >= total["steps"]:
            break
        input_ids, labels, mask = input_ids.to(dev), labels.to(dev), mask.to(dev)
        loads.clear()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # aux-loss-free balancing (padding tokens count too; they are few)
            for router, chosen in loads:
                counts = torch.bincount(chosen.flatten(), minlength=router.num_experts).float()
                router.e_score_correction_bias += bias_rate * torch.sign(counts.mean() - counts)
        log["steps"] = step + 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
        if eval_every and step and step % eval_every == 0:
            print(f"step {step} held-out exact greedy accuracy {exact_accuracy(model, tok.tokenizer, eval_cases, dev):.3f}",
                  flush=True)
    log["train_seconds"] = round(time.time() - start, 1)
    log["final_loss"] = loss.item()
    log["held_out_accuracy"] = exact_accuracy(model, tok.tokenizer, eval_cases, dev)
    log["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(json.dumps(log), flush=True)
    save_weights(model, out)
    _write_json(out / "train_log.json", log)
    return log


def save_weights(model, out: Path) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if "rotary" not in k}
    experts = {k: v for k, v in state.items() if ".mlp.experts." in k}
    torch.save(experts, out / "weights-experts.pt")
    torch.save({k: v for k, v in state.items() if k not in experts}, out / "weights-rest.pt")


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(Path(directory).glob("weights-*.pt")):
        state.update(torch.load(path, map_location="cpu"))
    return state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=0, help="0: as many as fit in --time-budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--short-batch", type=int, default=192)
    p.add_argument("--long-batch", type=int, default=48)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds of training when --steps is 0")
    p.add_argument("--eval-every", type=int, default=500)
    a = p.parse_args(argv)
    train(a.out, a.steps, a.seed, a.device, a.lr, a.short_batch, a.long_batch, a.workers, a.bias_rate,
          a.time_budget, a.eval_every)


if __name__ == "__main__":
    main()
