#!/usr/bin/env python3
"""Tokens/s through the streaming API vs calling prefill_and_generate directly, same model; and with
--streams, several concurrent streams (continuous batching).

    python benchmarks/api_throughput.py                       # the tiny synthetic model
    python benchmarks/api_throughput.py --gguf_path P --model_path D --max_new_tokens 128
    python benchmarks/api_throughput.py --demo --streams 1,2,4,8
    python benchmarks/api_throughput.py --synthetic q4_k_m --layers 3 --dense 1 --streams 1,2,4,8   # V3 widths

With --streams, each count N sends N chats at once (distinct prompts, greedy) and prints the aggregate
decode rate (all streams' tokens after their first, over the time from the first stream's first token
to the last token), the median stream's own decode rate, and time to first token, each against one
lone stream, and how many distinct routed experts a decode pass reads per MoE layer (its weight bytes
grow with those, not with its tokens).

Both paths use greedy decoding and the same prompt.  "decode" is the rate between the first and
the last token (what a user watching the stream sees); "end-to-end" includes prefill.  The API
path goes through HTTP, waitress, the engine thread and SSE framing, so the ratio shows the
server's overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from ktransformers.models.loader import load_model
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.model_backend import model_generate_fn
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server
from ktransformers.server.wsgi import BackgroundServer
from ktransformers.util.chat import build_prompt_ids
from ktransformers.util.events import FinishEvent
from ktransformers.util.sampling import SamplingParams
from ktransformers.util.utils import prefill_and_generate

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
SUBJECTS = ["a lighthouse keeper", "a clockmaker", "a river pilot", "a beekeeper", "a glassblower",
            "a mountain guide", "a night-train conductor", "a cartographer"]


def rates(start: float, text_times: list[float], tokens: int) -> tuple[float, float, int]:
    """(end-to-end tok/s, decode tok/s, tokens).

    Text held back by the detokenizer (partial UTF-8, possible stop strings) arrives merged, so
    both paths time the events that carry text and take the token count from the finish/usage.
    """
    e2e = tokens / (text_times[-1] - start)
    decode = (tokens - 1) / (text_times[-1] - text_times[0]) if len(text_times) > 1 else float("nan")
    return e2e, decode, tokens


def run_direct(loaded, max_new_tokens: int):
    ids = build_prompt_ids(loaded.tokenizer, MESSAGES)
    start, times = time.perf_counter(), []
    sampling = SamplingParams.from_generation_config(loaded.generation_config, temperature=0.0)
    for event in prefill_and_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens, sampling=sampling,
                                      generation_config=loaded.generation_config):   # as the server calls it
        if isinstance(event, FinishEvent):
            return rates(start, times, event.completion_tokens)
        if event.reasoning or event.content:
            times.append(time.perf_counter())
    raise RuntimeError("prefill_and_generate ended without a FinishEvent")


def stream_times(url: str, messages: list[dict], max_new_tokens: int) -> tuple[float, list[float], int]:
    """One greedy streamed chat: (send time, arrival time of each chunk with text, completion tokens)."""
    body = {"messages": messages, "max_tokens": max_new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, times, usage = time.perf_counter(), [], None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=1200) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"]:
                delta = chunk["choices"][0]["delta"]
                if delta.get("content") or delta.get("reasoning_content"):
                    times.append(time.perf_counter())
    return sent, times, usage["completion_tokens"]


def run_api(url: str, max_new_tokens: int):
    start, times, tokens = stream_times(url, MESSAGES, max_new_tokens)
    return rates(start, times, tokens)


def run_stream(url: str, subject: str, max_new_tokens: int) -> dict:
    """One streamed chat: send time, first and last text times, completion tokens."""
    sent, times, tokens = stream_times(url, [{"role": "user", "content": f"Write a long story about {subject}."}],
                                       max_new_tokens)
    return {"sent": sent, "first": times[0], "last": times[-1], "tokens": tokens}


class ExpertReads:
    """Counts, per routed-expert call of a decode pass (at most `max_rows` tokens), the distinct experts
    it reads: a pass's weight bytes grow with them, not with its tokens."""

    def __init__(self, model, max_rows: int):
        self.max_rows, self.calls, self.distinct = max_rows, 0, 0
        for name, module in model.named_modules():
            if name.endswith(".mlp.experts"):
                module.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        ids = inputs[1]
        if ids.shape[0] <= self.max_rows:  # prefill chunks are longer
            self.calls += 1
            self.distinct += int(ids.unique().numel())

    def take(self) -> float:
        """Mean distinct experts per call since the last take."""
        mean = self.distinct / self.calls if self.calls else float("nan")
        self.calls = self.distinct = 0
        return mean


def concurrency_table(url: str, counts: list[int], max_new_tokens: int, reads: ExpertReads) -> None:
    rows = []
    for n in counts:
        reads.take()
        with ThreadPoolExecutor(max_workers=n) as pool:
            streams = list(pool.map(lambda i: run_stream(url, SUBJECTS[i % len(SUBJECTS)], max_new_tokens), range(n)))
        start, end = min(s["first"] for s in streams), max(s["last"] for s in streams)
        aggregate = sum(s["tokens"] - 1 for s in streams) / (end - start)
        own = statistics.median((s["tokens"] - 1) / (s["last"] - s["first"]) for s in streams)
        ttft = [s["first"] - s["sent"] for s in streams]
        rows.append((n, aggregate, own, statistics.median(ttft), max(ttft), reads.take()))
    lone_aggregate, lone_own, lone_experts = rows[0][1], rows[0][2], rows[0][5]
    print(f"{'streams':>7} {'aggregate tok/s':>15} {'x 1 stream':>10} {'per stream tok/s':>16} {'of lone':>7} "
          f"{'TTFT median / max s':>19} {'experts read per layer':>22}")
    for n, aggregate, own, ttft_median, ttft_max, experts in rows:
        print(f"{n:>7} {aggregate:>15.2f} {aggregate / lone_aggregate:>9.2f}x {own:>16.2f} {own / lone_own:>6.0%} "
              f"{ttft_median:>10.2f} / {ttft_max:.2f} {experts:>11.1f} ({experts / lone_experts:.1f}x)")


def load(args, max_batch: int):
    if args.synthetic:
        sys.path.insert(0, str(Path(__file__).parent))
        import synthetic_model
        return synthetic_model.served_model(args.synthetic, args.layers, args.dense, args.max_context, max_batch)
    if args.demo:
        from ktransformers.demo import demo_paths
        model_dir, gguf = demo_paths()
        args.gguf_path, args.model_path = str(gguf), str(model_dir)
    elif args.gguf_path is None:
        from ktransformers.tools.make_tiny_model import make_tiny_model
        tiny = make_tiny_model(tempfile.mkdtemp(prefix="kt-bench-"))
        args.gguf_path, args.model_path = str(tiny / "model.gguf"), str(tiny)
    return load_model(args.gguf_path, model_path=args.model_path, max_context=args.max_context,
                      cpu_infer=args.cpu_infer, max_batch=max_batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf_path")
    p.add_argument("--model_path")
    p.add_argument("--demo", action="store_true", help="the shipped demo model")
    p.add_argument("--synthetic", help="a synthetic model with DeepSeek-V3's widths, this mix (q4_k_m, ud-iq1_s)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dense", type=int, default=1)
    p.add_argument("--streams", type=lambda t: [int(n) for n in t.split(",")], help="e.g. 1,2,4,8")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--max_context", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cpu_infer", type=int)
    args = p.parse_args()
    max_batch = max(args.streams) if args.streams else 1
    loaded = load(args, max_batch)
    engine = Engine(model_generate_fn(loaded, cache_tokens=0), queue_size=max(8, max_batch), max_batch=max_batch)
    settings = ServerSettings(max_context=int(loaded.model.max_context))
    if args.streams:
        reads = ExpertReads(loaded.model, max_batch)
        with BackgroundServer(create_app(engine, settings), queue_size=max(8, max_batch)) as url:
            run_stream(url, SUBJECTS[0], 8)  # warm-up: lazy paths
            with ThreadPoolExecutor(max_workers=max_batch) as pool:  # and each batch size's CUDA graphs
                list(pool.map(lambda i: run_stream(url, SUBJECTS[i], 8), range(max_batch)))
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
            print(f"model: {args.synthetic or args.gguf_path}  {device}, {torch.get_num_threads()} threads, "
                  f"max_new_tokens={args.max_new_tokens}, decode passes by size so far: "
                  f"{dict(sorted(engine.decode_batch_sizes.items()))}")
            concurrency_table(url, args.streams, args.max_new_tokens, reads)
        engine.stop()
        return
    results = {"direct": [], "api": []}
    with BackgroundServer(create_app(engine, settings)) as url:
        # direct runs on one long-lived thread, like the engine's worker, so both paths run alike
        direct_thread = ThreadPoolExecutor(max_workers=1)
        direct_thread.submit(run_direct, loaded, args.max_new_tokens).result()   # warm-up: first runs are slow
        run_api(url, args.max_new_tokens)
        for _ in range(args.runs):                # interleave so drift hits both equally
            results["direct"].append(direct_thread.submit(run_direct, loaded, args.max_new_tokens).result())
            results["api"].append(run_api(url, args.max_new_tokens))
        direct_thread.shutdown()
    engine.stop()

    print(f"model: {args.gguf_path}  max_new_tokens={args.max_new_tokens}  runs={args.runs} (median)")
    median = {name: [statistics.median(r[i] for r in runs) for i in range(3)] for name, runs in results.items()}
    for name, (e2e, decode, tokens) in median.items():
        print(f"  {name:6s}: {tokens:5.0f} tokens  end-to-end {e2e:9.2f} tok/s  decode {decode:9.2f} tok/s")
    d, a = median["direct"], median["api"]
    print(f"  api/direct: end-to-end {a[0] / d[0]:.3f}  decode {a[1] / d[1]:.3f}  "
          f"(per-token overhead {1000 * (1 / a[1] - 1 / d[1]):+.3f} ms)")
    with scripted_server() as srv:               # no model at all: the server's own ceiling
        ceiling = statistics.median(run_api(srv.url, 2000)[1] for _ in range(args.runs))
    print(f"  server ceiling (scripted generator, no model): {ceiling:.0f} tok/s "
          f"= {1000 / ceiling:.3f} ms per streamed token")


if __name__ == "__main__":
    main()
