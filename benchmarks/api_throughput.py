#!/usr/bin/env python3
"""Tokens/s through the streaming API vs calling prefill_and_generate directly, same model.

    python benchmarks/api_throughput.py                       # the tiny synthetic model
    python benchmarks/api_throughput.py --gguf_path P --model_path D --max_new_tokens 128

Both paths use greedy decoding and the same prompt.  "decode" is the rate between the first and
the last token (what a user watching the stream sees); "end-to-end" includes prefill.  The API
path goes through HTTP, waitress, the engine thread and SSE framing, so the ratio shows the
server's overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests

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


def run_api(url: str, max_new_tokens: int):
    body = {"messages": MESSAGES, "max_tokens": max_new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, times, usage = time.perf_counter(), [], None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
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
    return rates(start, times, usage["completion_tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf_path")
    p.add_argument("--model_path")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--max_context", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cpu_infer", type=int)
    args = p.parse_args()
    if args.gguf_path is None:
        from ktransformers.tools.make_tiny_model import make_tiny_model
        tiny = make_tiny_model(tempfile.mkdtemp(prefix="kt-bench-"))
        args.gguf_path, args.model_path = str(tiny / "model.gguf"), str(tiny)
    loaded = load_model(args.gguf_path, model_path=args.model_path, max_context=args.max_context,
                        cpu_infer=args.cpu_infer)
    engine = Engine(model_generate_fn(loaded), queue_size=2)
    settings = ServerSettings(max_context=int(loaded.model.max_context))
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
