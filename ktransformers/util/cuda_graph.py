"""Decode one token through static buffers, the GPU segments between CPU expert calls as CUDA graphs.

A decode step of the hybrid model is, per MoE layer: GPU work (attention, norms, router) -> CPU
routed experts -> GPU again. The GPU work is dozens of small kernels whose launch overhead
rivals their run time, so each layer's GPU segments are captured once as CUDA graphs over
static buffers and replayed every step; the position is a device tensor (static-shape attention,
MLAttention.decode_static), so one capture serves every step whose positions fit its window of cache
rows. Windows are powers of two from MIN_WINDOW tokens up to max_context (`context_window`): a step
scores the rows its context needs within 2x, not the whole cache (at 32K tokens ~38 MB a layer).

Per MoE layer:
    A  hidden += attn(norm(hidden)); x = norm2(hidden); router(x); x, ids, weights -> pinned host
    B  shared = shared_experts(x)                 (queued; runs while the CPU does the experts)
    -  host: wait for A's copies, routed = experts(x, ids, weights) -> pinned host
    C  hidden += routed * scale + shared          (upload from pinned memory inside the graph)
Dense layers are one segment, the final norm + lm_head another.

`StaticDecoder(model, use_cuda_graph=True)`: graphs when the step's modules sit on cuda and
`use_cuda_graph`; otherwise the same segments run eagerly (CPU-only machines, tests). Everything a
step runs besides the routed experts and the embedding must sit on one device (`step_devices`).
`step_batch(token_ids, positions, slots) -> float32 logits [B, vocab]` on the model's device: one token
of each of B sequences, each in its own cache slot (the model's n_slots bound B; each B and window
gets its own graphs, captured on first use); `step(token_id, position)` is the one-row step on slot 0. The cache
is shared with `model.forward`, so prefill with the model, then decode with `step_batch`.
"""

from __future__ import annotations

import time

import torch

from ktransformers.gguf.dequant import dequantize_rows
from ktransformers.models.layers import MoE, run

MIN_WINDOW = 512  # cache rows the smallest graphs score (smaller windows would save little and add captures)


def context_window(last_position: int, max_context: int) -> int:
    """Cache rows a step whose largest position is last_position scores: the smallest power of two
    above it (at least MIN_WINDOW), at most max_context."""
    window = MIN_WINDOW
    while window <= last_position:
        window *= 2
    return min(window, max_context)


def capture_graph(fn, pool=None):
    """Run fn once on a side stream (the warm-up torch asks for before a capture), then capture it as a
    CUDA graph -> (graph, fn's return value from the capture: the graph's static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def step_devices(model) -> dict[torch.device, str]:
    """{device: the name of a module on it} over the placed modules that a step's segments run: all but
    the routed experts (called between segments) and the embedding (looked up before them)."""
    devices = {}
    for name, module in model.named_modules():
        if hasattr(module, "placement") and name != "model.embed_tokens" and not name.endswith(".mlp.experts"):
            devices.setdefault(module.placement.device, name)
    return devices


class StaticDecoder:
    def __init__(self, model, use_cuda_graph: bool = True):
        self.model = model
        layers = model.model.layers
        devices = step_devices(model)
        if len(devices) != 1:
            raise ValueError("StaticDecoder needs every module of a decode step but the routed experts and the "
                             "embedding on one device; this placement spreads them: "
                             + ", ".join(f"{name} on {device}" for device, name in devices.items()))
        self.device, self.dtype = next(iter(devices)), layers[0].input_layernorm.placement.dtype
        self.use_graphs = bool(use_cuda_graph) and self.device.type == "cuda" and torch.cuda.is_available()
        dev, dt = self.device, self.dtype
        hidden_size = model.config.hidden_size
        pin = self.device.type == "cuda"
        # static buffers for the largest batch (one row per cache slot); a step of n rows uses views [:n]
        rows = self.max_batch = getattr(model, "n_slots", 1)

        self.hidden = torch.zeros(rows, hidden_size, device=dev, dtype=dt)
        self.position = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.logits = torch.zeros(rows, model.config.vocab_size, device=dev, dtype=torch.float32)
        k = model.config.num_experts_per_tok or 1
        self.x_moe = torch.zeros(rows, hidden_size, device=dev, dtype=dt)
        self.shared = torch.zeros(rows, hidden_size, device=dev, dtype=dt)
        self.routed_dev = torch.zeros(rows, hidden_size, device=dev, dtype=torch.float32)
        self.x_host = torch.zeros(rows, hidden_size, dtype=torch.float32, pin_memory=pin)
        self.ids_host = torch.zeros(rows, k, dtype=torch.int64, pin_memory=pin)
        self.w_host = torch.zeros(rows, k, dtype=torch.float32, pin_memory=pin)
        self.routed_host = torch.zeros(rows, hidden_size, dtype=torch.float32, pin_memory=pin)

        self.token = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.embed_table = self._device_embedding() if self.use_graphs else None
        self.pool = None
        self.plans = {}  # (batch size, window) -> (per-layer plan, head), captured on first use when graphs are on

    @property
    def graphs_captured(self) -> bool:
        return self.use_graphs and bool(self.plans)

    def _device_embedding(self):
        """The token table decoded once onto the GPU (bf16: 1.8 GB for DeepSeek-V3), so a step does no
        CPU dequantization; None when the embedding is not a quantized table."""
        embed = self.model.model.embed_tokens
        table = getattr(embed, "table", None)
        if table is None:
            return None
        rows, cols = table.shape
        return dequantize_rows(table.raw().to(self.device), table.ggml_type, rows, cols, dtype=self.dtype)

    # -- segments of an n-row step: closures over views of the static buffers ------------------------
    def _segments(self, n: int, window: int):
        """(plan, head) for steps of n rows whose positions are below `window`: per layer ("dense", seg)
        or ("moe", seg_a, seg_b, seg_c, experts)."""
        plan = []
        for layer in self.model.model.layers:
            if isinstance(layer.mlp, MoE):
                plan.append(("moe", self._attn_and_router(layer, n, window), self._shared(layer, n),
                             self._combine(layer, n), layer.mlp.experts))
            else:
                plan.append(("dense", self._dense(layer, n, window)))
        return plan, self._head(n)

    def _attention(self, layer, n, window):
        h = self.hidden[:n]
        attn_out = layer.self_attn.decode_static(run(layer.input_layernorm, h), self.position[:n], self.slots[:n],
                                                 window)
        h.copy_(h + attn_out.to(self.device, self.dtype))

    def _dense(self, layer, n, window):
        def segment():
            self._attention(layer, n, window)
            h = self.hidden[:n]
            h.copy_(h + layer.mlp(run(layer.post_attention_layernorm, h)).to(self.device, self.dtype))
        return segment

    def _attn_and_router(self, layer, n, window):
        def segment():
            self._attention(layer, n, window)
            x = run(layer.post_attention_layernorm, self.hidden[:n])
            self.x_moe[:n].copy_(x)
            ids, weights = run(layer.mlp.gate, x)
            self.x_host[:n].copy_(x.float(), non_blocking=True)
            self.ids_host[:n].copy_(ids, non_blocking=True)
            self.w_host[:n].copy_(weights, non_blocking=True)
        return segment

    def _shared(self, layer, n):
        shared_experts = layer.mlp.shared_experts

        def segment():
            if shared_experts is not None:
                self.shared[:n].copy_(shared_experts(self.x_moe[:n]))
        return segment

    def _combine(self, layer, n):
        scale = layer.mlp.routed_scaling_factor
        has_shared = layer.mlp.shared_experts is not None

        def segment():
            self.routed_dev[:n].copy_(self.routed_host[:n], non_blocking=True)
            out = self.routed_dev[:n].to(self.dtype) * scale
            if has_shared:
                out = out + self.shared[:n]
            self.hidden[:n].copy_(self.hidden[:n] + out)
        return segment

    def _head(self, n):
        def segment():
            h = run(self.model.model.norm, self.hidden[:n])
            self.logits[:n].copy_(run(self.model.lm_head, h).float())
        return segment

    # -- capture -----------------------------------------------------------------------------
    def _capture(self, n: int, window: int):
        """Warm an n-row step's segments up on a side stream (as torch asks), then capture each in the
        pool all batch sizes and windows share (their steps never overlap)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        plan, head = self._segments(n, window)
        # the warm-up writes the window's last row of the first n slots: save those rows and put them back afterwards
        last = window - 1
        caches = [layer.self_attn.kv_slots for layer in self.model.model.layers]
        saved = [cache[:n, last].clone() for cache in caches]
        self.position[:n].fill_(last)
        self.slots[:n].copy_(torch.arange(n, device=self.device))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run_eager(plan, head, n)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for cache, rows in zip(caches, saved):
            cache[:n, last].copy_(rows)

        def capture(fn):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn()
            return graph.replay

        captured = []
        for entry in plan:
            if entry[0] == "dense":
                captured.append(("dense", capture(entry[1])))
            else:
                captured.append(("moe", capture(entry[1]), capture(entry[2]), capture(entry[3]), entry[4]))
        return captured, capture(head)

    def _run_eager(self, plan, head, n):
        for entry in plan:
            if entry[0] == "dense":
                entry[1]()
            else:
                entry[1]()
                entry[2]()
                if self.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()  # the pinned copies must have landed
                self._routed(entry[4], n)
                entry[3]()
        head()

    def _routed(self, experts, n):
        self.routed_host[:n].copy_(experts(self.x_host[:n], self.ids_host[:n], self.w_host[:n]))

    def _plan(self, n: int, window: int):
        key = (n, window)
        if key not in self.plans:
            self.plans[key] = self._capture(n, window) if self.use_graphs else self._segments(n, window)
        return self.plans[key]

    # -- one step ----------------------------------------------------------------------------
    def step(self, token_id: int, position: int, profile: dict | None = None) -> torch.Tensor:
        """Logits [vocab] for `token_id` at `position` of slot 0: a one-row `step_batch`."""
        return self.step_batch([token_id], [position], [0], profile)[0]

    @torch.inference_mode()
    def step_batch(self, token_ids: list[int], positions: list[int], slots: list[int],
                   profile: dict | None = None) -> torch.Tensor:
        """Logits [B, vocab] (float32, on the model's device): token_ids[b] at positions[b] of cache slot
        slots[b]; writes those cache rows. Each batch size and window (`context_window` of the largest
        position) has its own CUDA graphs, captured on first use.

        profile: when given, adds per-part seconds ("embed", "dense", "moe_gpu", "experts",
        "combine", "head") measured with a sync after each part (slower; for breakdowns only).
        """
        n = len(token_ids)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"a step takes 1 to {self.max_batch} tokens (the model's cache slots), got {n}")
        for position in positions:
            if not 0 <= position < self.model.max_context:
                raise ValueError(f"position {position} outside the context window of {self.model.max_context} tokens")
        vocab = self.model.config.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab:
                raise ValueError(f"token id {token_id} out of range 0..{vocab - 1}")
        plan, head = self._plan(n, context_window(max(positions), self.model.max_context))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        clock = _Clock(profile, sync)

        ids = torch.tensor(token_ids, dtype=torch.int64)
        if self.embed_table is not None:
            self.token[:n].copy_(ids, non_blocking=True)
            torch.index_select(self.embed_table, 0, self.token[:n], out=self.hidden[:n])
        else:
            embedded = self.model.model.embed_tokens(ids)
            self.hidden[:n].copy_(embedded.to(self.device, self.dtype), non_blocking=True)
        self.position[:n].copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        clock.lap("embed")
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        for entry in plan:
            if entry[0] == "dense":
                entry[1]()
                clock.lap("dense")
                continue
            _, attn_and_router, shared, combine, experts = entry
            attn_and_router()
            if ready is not None:
                ready.record()
            shared()  # queued behind the copies: the GPU runs it while the CPU runs the experts
            clock.lap("moe_gpu")
            if ready is not None:
                ready.synchronize()
            self._routed(experts, n)
            clock.lap("experts")
            combine()
            clock.lap("combine")
        head()
        logits = self.logits[:n].clone()  # never hand out the static buffer itself
        clock.lap("head")
        return logits


class _Clock:
    def __init__(self, profile, sync):
        self.profile, self.sync = profile, sync
        self.last = time.perf_counter() if profile is not None else 0.0

    def lap(self, part: str):
        if self.profile is None:
            return
        self.sync()
        now = time.perf_counter()
        self.profile[part] = self.profile.get(part, 0.0) + now - self.last
        self.last = now
