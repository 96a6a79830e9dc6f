"""Head-to-head with llama.cpp on the same GGUF file, on the same machine, in one run.

    python benchmarks/vs_llamacpp.py [--mix q4_k_m,ud-iq1_s] [--moe-layers 2,4] [--modes cpu,hybrid]
        [--threads N] [--prefill 128,1024,4096] [--decode 32] [--contexts 0,4096] [--reps 3]
        [--work DIR] [--llama-source DIR | --llama-source-tar FILE] [--llama-bench PATH]
        [--llama-bench-cuda PATH] [--llama-args ARGS] [--keep-files] [--json out.json]

Files: benchmarks/synthetic_model.write_gguf, DeepSeek-V3's real widths (7168 hidden, 256 experts,
top-8) with 1 dense + N MoE layers and a tiny vocabulary, one file per --moe-layers value so the
cost of one MoE layer is the slope between them. llama.cpp: `llama-bench` built with cmake from the
llama-cpp-python sdist's vendored sources (ktransformers/tools/llama_cpp.py): a native CPU build
for CPU-only, a CUDA build run with `-ngl 99 -ot exps=CPU` for hybrid. Ours: load_model +
prefill_and_generate in a fresh process per file and mode, greedy, the same thread count.

Both engines: prefill P tokens from an empty cache (tok/s), decode --decode tokens after a context
of C tokens (tok/s; C = 0 means from an empty cache, llama-bench's tg at depth 0); the median of
--reps runs each. The table gives both rates, ours / llama.cpp, and the per-MoE-layer slope of the
decode step in ms. Ours' resident memory after loading is printed next to the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # this checkout's ktransformers, installed or not

import ktransformers  # noqa: E402,F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
from ktransformers.tools import llama_cpp  # noqa: E402

DENSE = 1


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def llama_bench_binaries(args, modes) -> dict[str, Path]:
    """mode -> llama-bench, built from source unless given."""
    given = {"cpu": args.llama_bench, "hybrid": args.llama_bench_cuda}
    if all(given[m] for m in modes):
        return {m: Path(given[m]) for m in modes}
    if args.llama_source_tar:
        source = llama_cpp.unpack_source(Path(args.llama_source_tar), args.work)
    else:
        source = Path(args.llama_source) if args.llama_source else llama_cpp.llama_cpp_source(args.work)
    options = {"cpu": ["-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF"],
               "hybrid": ["-DGGML_NATIVE=ON", "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"]}
    return {m: Path(given[m]) if given[m] else
            llama_cpp.build(source, args.work / f"build-{m}", ["llama-bench"], options[m]) / "llama-bench"
            for m in modes}


def run_llama(binary: Path, gguf: Path, mode: str, args) -> dict[str, float]:
    """test name -> median tok/s over the repetitions, from llama-bench's JSON."""
    common = [str(binary), "-m", str(gguf), "-t", str(args.threads), "-r", str(args.reps), "-o", "json"]
    common += ["-ngl", "99", "-ot", "exps=CPU"] if mode == "hybrid" else ["-ngl", "0"]
    common += shlex.split(args.llama_args)
    runs = [["-p", ",".join(map(str, args.prefill)), "-n", "0"]] if args.prefill else []
    runs += [["-p", "0", "-n", str(args.decode), "-d", ",".join(map(str, args.contexts))]]
    results = {}
    for extra in runs:
        out = subprocess.run(common + extra, check=True, capture_output=True, text=True).stdout
        for test in json.loads(out):
            name = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else f"tg{test['n_gen']}@{test['n_depth']}"
            results[name] = statistics.median(test["samples_ts"])
    return results


def run_ours(gguf: Path, mode: str, args) -> dict:
    """Ours in a fresh process (this script's `ours` command), as a dict of tok/s and memory."""
    command = [sys.executable, __file__, "ours", str(gguf), mode, str(args.threads), ",".join(map(str, args.prefill)),
               str(args.decode), ",".join(map(str, args.contexts)), str(args.reps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_ours(gguf: str, mode: str, threads: int, prefill: list[int], decode: int, contexts: list[int], reps: int):
    import psutil
    import torch

    from ktransformers.models.loader import load_model
    from ktransformers.util.utils import prefill_and_generate

    max_context = max([*prefill, *(c + decode for c in contexts)]) + 8
    loaded = load_model(gguf, device="cuda" if mode == "hybrid" else "cpu", max_context=max_context, cpu_infer=threads)
    rss = psutil.Process().memory_info().rss
    vocab = loaded.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def finish(n_prompt: int, n_new: int):
        ids = torch.randint(3, vocab, (n_prompt,), generator=generator).tolist()
        events = prefill_and_generate(loaded.model, loaded.tokenizer, ids, max_new_tokens=n_new, eos_token_ids=[])
        return list(events)[-1]

    finish(16, 8)  # warm-up: kernels, caches, CUDA graphs
    results = {"rss_bytes": rss}
    for n in prefill:
        results[f"pp{n}"] = statistics.median(finish(n, 1).prefill_tokens_per_s for _ in range(reps))
    for context in contexts:
        # decode --decode tokens after `context` cached ones (0: the first token sees only itself)
        runs = [finish(max(context, 1), decode + 1).decode_tokens_per_s for _ in range(reps)]
        results[f"tg{decode}@{context}"] = statistics.median(runs)
    print(json.dumps(results))


def slope_ms(rates: dict[int, float]) -> float | None:
    """ms per token one more MoE layer costs: (1/rate) between the smallest and largest layer count."""
    if len(rates) < 2 or not all(rates.values()):
        return None
    lo, hi = min(rates), max(rates)
    return (1e3 / rates[hi] - 1e3 / rates[lo]) / (hi - lo)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mix", default="q4_k_m,ud-iq1_s")
    p.add_argument("--moe-layers", type=ints, default=[2, 4])
    p.add_argument("--modes", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    p.add_argument("--prefill", type=ints, default=[128, 1024, 4096])
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--contexts", type=ints, default=[0, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ktransformers" / "vs_llamacpp")
    p.add_argument("--llama-source", help="a llama.cpp source tree (default: the llama-cpp-python sdist's)")
    p.add_argument("--llama-source-tar", help="a tarball written by ktransformers.tools.llama_cpp.pack_source")
    p.add_argument("--llama-bench", help="a CPU llama-bench to use instead of building one")
    p.add_argument("--llama-bench-cuda", help="a CUDA llama-bench to use instead of building one")
    p.add_argument("--llama-args", default="", help="more llama-bench options, e.g. '--repack 0'")
    p.add_argument("--keep-files", action="store_true")
    p.add_argument("--override", action="append", default=[], metavar="KEY=INT",
                   help="change a width of the files (e.g. n_routed_experts=64 where memory is short)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads is None:
        import psutil

        args.threads = psutil.cpu_count(logical=False) or os.cpu_count()
    args.work.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    binaries = llama_bench_binaries(args, modes)

    import synthetic_model

    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.override)}
    rows = []
    for mix in args.mix.split(","):
        for moe in args.moe_layers:
            gguf = args.work / f"{mix}-{DENSE}+{moe}{''.join('-' + o for o in args.override)}.gguf"
            if not gguf.exists():
                started = time.perf_counter()
                synthetic_model.write_gguf(gguf, DENSE, moe, mix, **overrides)
                print(f"wrote {gguf.name} ({gguf.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - started:.0f} s",
                      flush=True)
            for mode in modes:
                llama = run_llama(binaries[mode], gguf, mode, args)
                ours = run_ours(gguf, mode, args)
                rows.append(dict(mix=mix, moe_layers=moe, mode=mode, file_bytes=gguf.stat().st_size, llama=llama,
                                 ours=ours))
                print(json.dumps(rows[-1]), flush=True)
            if not args.keep_files:
                gguf.unlink()
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


def print_table(rows: list[dict], args):
    print(f"\n{args.threads} threads; median of {args.reps} runs; tok/s (llama.cpp / ours / ours:llama.cpp)")
    print(f"{'mode':7s} {'mix':9s} {'layers':7s} {'test':10s} {'llama.cpp':>10s} {'ours':>8s} {'ratio':>6s}")
    for row in rows:
        for test, rate in row["llama"].items():
            ours = row["ours"].get(test, 0.0)
            print(f"{row['mode']:7s} {row['mix']:9s} 1+{row['moe_layers']:<5d} {test:10s} {rate:10.2f} {ours:8.2f} "
                  f"{ours / rate if rate else 0:6.2f}")
        print(f"{'':7s} {'':9s} {'':7s} ours' resident memory {row['ours']['rss_bytes'] / 1e9:.1f} GB for a "
              f"{row['file_bytes'] / 1e9:.1f} GB file")
    print("\nper-MoE-layer decode slope, ms per token (llama.cpp / ours)")
    for mode in sorted({r["mode"] for r in rows}):
        for mix in sorted({r["mix"] for r in rows}):
            group = [r for r in rows if r["mode"] == mode and r["mix"] == mix]
            for test in group[0]["llama"] if group else []:
                if test.startswith("tg"):
                    theirs = slope_ms({r["moe_layers"]: r["llama"][test] for r in group})
                    ours = slope_ms({r["moe_layers"]: r["ours"].get(test, 0.0) for r in group})
                    if theirs and ours:
                        print(f"{mode:7s} {mix:9s} {test:10s} {theirs:6.2f} / {ours:6.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ours":
        gguf, mode, threads, prefill, decode, contexts, reps = sys.argv[2:9]
        measure_ours(gguf, mode, int(threads), ints(prefill), int(decode), ints(contexts), int(reps))
    else:
        main()
