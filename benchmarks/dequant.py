"""Throughput of ktransformers.gguf.dequant per ggml type, next to the machine's memory-copy bandwidth.

    python benchmarks/dequant.py [--mb 32] [--repeats 3] [--types Q4_K,IQ2_XXS] [--numpy] [--device cuda] [--threads N]

Each type decodes a tensor of about --mb MB of float32 output; the best of --repeats runs is shown
as MB/s of quantized input read and of float32 output written. --numpy adds the gguf package's
numpy decoder on a 1/8-size tensor for comparison.
"""

from __future__ import annotations

import argparse
import time

import ktransformers  # noqa: F401  before torch: makes torch's OpenMP threads sleep, not spin, between ops
import numpy as np
import torch
from gguf.quants import dequantize as gguf_dequantize

from ktransformers.gguf.dequant import SUPPORTED_TYPES, dequantize_rows
from ktransformers.gguf.ggml_types import block_info, resolve_type
from ktransformers.gguf.random_blocks import scale_fields, write_scale

MB = 1e6
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def best_seconds(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    def timed():
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm up: grids, caches, allocator
    return min(timed() for _ in range(repeats))


def copy_bandwidth(repeats: int, device: torch.device) -> float:
    """GB/s of bytes moved (read + written) copying 256 MB into an existing buffer (no page faults)."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / seconds / 1e9


def sample_blocks(qtype, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """Random bytes with sane fp16 scales (decode speed does not depend on the values)."""
    elements, block_bytes = block_info(qtype)
    if elements == 1:  # F32 / F16 / BF16
        values = torch.from_numpy(rng.standard_normal(n_rows * n_cols, dtype=np.float32))
        return values.to(FLOAT_DTYPES[qtype.name]).view(torch.uint8).numpy()
    blocks = rng.integers(0, 256, size=(n_rows * n_cols // elements, block_bytes), dtype=np.uint8)
    for name in scale_fields(qtype):
        write_scale(blocks, qtype, name, rng.uniform(1e-4, 1e-3, blocks.shape[0]))
    return blocks.reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=32, help="float32 output size per type, MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", default=",".join(t.name for t in SUPPORTED_TYPES))
    parser.add_argument("--numpy", action="store_true", help="also time gguf's numpy decoder (1/8 size)")
    parser.add_argument("--device", default="cpu", help="where to decode (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rng = np.random.default_rng(0)
    n_cols = 7168  # DeepSeek-V3 hidden size; a multiple of every block size
    n_rows = max(1, int(args.mb * MB / 4 / n_cols))
    bandwidth = copy_bandwidth(args.repeats, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; output {n_rows}x{n_cols} float32 "
          f"({n_rows * n_cols * 4 / MB:.0f} MB)")
    print(f"memory copy bandwidth (torch copy_ of 256 MB, read+write): {bandwidth:.2f} GB/s\n")
    header = f"{'type':8s} {'in MB/s':>9s} {'out MB/s':>9s} {'% of copy':>9s} {'ms':>8s}"
    print(header + (f" {'gguf numpy out MB/s':>20s}" if args.numpy else ""))
    out = torch.empty(n_rows, n_cols, device=device)
    for name in args.types.split(","):
        qtype = resolve_type(name)
        raw = torch.from_numpy(sample_blocks(qtype, n_rows, n_cols, rng)).to(device)
        seconds = best_seconds(lambda: dequantize_rows(raw, qtype, n_rows, n_cols, out=out), args.repeats, device)
        moved = raw.numel() + out.numel() * 4  # bytes read + written, comparable to the copy figure
        line = (f"{qtype.name:8s} {raw.numel() / seconds / MB:9.0f} {out.numel() * 4 / seconds / MB:9.0f} "
                f"{100 * moved / seconds / 1e9 / bandwidth:8.0f}% {seconds * 1e3:8.1f}")
        if args.numpy and qtype.name == "F32":
            line += f" {'(a view)':>20s}"  # gguf returns the bytes reinterpreted, no decoding to time
        elif args.numpy:
            rows = max(1, n_rows // 8)
            small = raw[: raw.numel() * rows // n_rows].cpu().numpy().reshape(rows, -1)
            np_seconds = best_seconds(lambda: gguf_dequantize(small, qtype), 1)
            line += f" {rows * n_cols * 4 / np_seconds / MB:20.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
