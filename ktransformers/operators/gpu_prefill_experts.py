"""Routed experts of a long prefill chunk on the GPU, streaming the CPU backend's raw GGUF blocks.

With hundreds of tokens every expert is busy and the CPU kernels become compute bound (about
0.5 TFLOP/s on 16 cores), while uploading a layer's blocks (a few GB) over PCIe and decoding
them on the GPU takes a fraction of that. Experts go up in chunks of consecutive experts: the
host packs a chunk's gate/up/down blocks into a pinned buffer (torch's multi-threaded copy), a
side stream uploads it, the compute stream waits for it, dequantizes to bf16 and runs the
experts; two buffers alternate so packing/uploading chunk i+1 overlaps computing chunk i.
Decode (one token) stays on the CPU kernels, which read only the 8 chosen experts.

Same contract as an Experts backend's forward, returning float32 on `device`; any device works
(on the CPU there is no staging, which keeps the logic testable without a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktransformers.gguf.dequant import dequantize_rows

CHUNK_BYTES = 256 << 20  # raw bytes uploaded per chunk (gate + up + down of several experts)
_staging: dict = {}


class UploadStaging:
    """Two pinned host buffers, two device buffers and their events; one per (device, size), shared by
    every layer (layers run one after another, and the events order the reuse)."""

    def __init__(self, device: torch.device, size: int):
        self.pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.on_device = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.consumed = [torch.cuda.Event() for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(device)

    @staticmethod
    def get(device: torch.device, size: int) -> "UploadStaging":
        if (device, size) not in _staging:
            with torch.inference_mode(False):  # plain tensors: usable inside and outside inference mode
                _staging[(device, size)] = UploadStaging(device, size)
        return _staging[(device, size)]


class StreamedExperts:
    def __init__(self, cpu_experts, device, dtype=torch.bfloat16, chunk_bytes: int = CHUNK_BYTES):
        """cpu_experts: a CpuQuantExperts (raw `gate_raw/up_raw/down_raw` stacks, `types`, widths)."""
        src = cpu_experts
        self.device, self.dtype = torch.device(device), dtype
        self.n_experts, self.hidden, self.intermediate = src.n_experts, src.hidden, src.intermediate
        self.stacks = (src.gate_raw, src.up_raw, src.down_raw)
        self.types = src.types
        self.strides = [raw.numel() // self.n_experts for raw in self.stacks]  # bytes per expert
        expert_bytes = sum(self.strides)
        self.per_chunk = max(1, min(self.n_experts, chunk_bytes // expert_bytes))
        self.cuda = self.device.type == "cuda"
        if self.cuda:  # staging is made on first use, so building the model pins nothing
            self.staging_size = max(chunk_bytes, expert_bytes)

    def _upload(self, lo: int, hi: int, slot: int) -> list[torch.Tensor]:
        """The raw gate/up/down blocks of experts lo..hi-1 on the device (three flat uint8 views)."""
        slices = [raw[lo * s:hi * s] for raw, s in zip(self.stacks, self.strides)]
        if not self.cuda:
            return [s.to(self.device) for s in slices]
        st = UploadStaging.get(self.device, self.staging_size)
        st.copied[slot].synchronize()  # the last upload from this pinned buffer has finished
        sizes = [s.numel() for s in slices]
        total = sum(sizes)
        for part, src in zip(st.pinned[slot][:total].split(sizes), slices):
            part.copy_(src)  # torch's copy runs on all intra-op threads
        with torch.cuda.stream(st.copy_stream):
            st.copy_stream.wait_event(st.consumed[slot])  # the GPU is done decoding what this buffer held
            st.on_device[slot][:total].copy_(st.pinned[slot][:total], non_blocking=True)
            st.copied[slot].record(st.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(st.copied[slot])
        return list(st.on_device[slot][:total].split(sizes))

    def _decode(self, raws, count: int, slot: int):
        (gate_t, up_t, down_t), H, I = self.types, self.hidden, self.intermediate
        gate = dequantize_rows(raws[0], gate_t, count * I, H, dtype=self.dtype).view(count, I, H)
        up = dequantize_rows(raws[1], up_t, count * I, H, dtype=self.dtype).view(count, I, H)
        down = dequantize_rows(raws[2], down_t, count * H, I, dtype=self.dtype).view(count, H, I)
        if self.cuda:
            UploadStaging.get(self.device, self.staging_size).consumed[slot].record(
                torch.cuda.current_stream(self.device))
        return gate, up, down

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        n_tokens, k = topk_ids.shape
        xs = x.to(self.device, self.dtype)
        ids = topk_ids.to(self.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_experts):
            raise ValueError(f"expert id out of range 0..{self.n_experts - 1}")
        # (token, slot) pairs sorted by expert: each expert's rows are one contiguous run
        order = torch.argsort(ids, stable=True)
        tokens = order // k
        weights = topk_weights.to(self.device, torch.float32).reshape(-1)[order]
        counts = torch.bincount(ids, minlength=self.n_experts).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)

        out = torch.zeros(n_tokens, self.hidden, device=self.device, dtype=torch.float32)
        chunks = [(lo, min(lo + self.per_chunk, self.n_experts)) for lo in range(0, self.n_experts, self.per_chunk)]
        chunks = [(lo, hi) for lo, hi in chunks if any(counts[lo:hi])]
        for i, (lo, hi) in enumerate(chunks):
            gate, up, down = self._decode(self._upload(lo, hi, i % 2), hi - lo, i % 2)
            for e in range(lo, hi):
                if not counts[e]:
                    continue
                rows = tokens[starts[e]:starts[e + 1]]
                h = xs[rows]
                act = F.silu(h @ gate[e - lo].T) * (h @ up[e - lo].T)
                y = (act @ down[e - lo].T).float() * weights[starts[e]:starts[e + 1], None]
                out.index_add_(0, rows, y)
        return out
