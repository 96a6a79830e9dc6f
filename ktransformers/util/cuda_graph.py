"""Decode one token through static buffers, the GPU segments between CPU expert calls as CUDA graphs.

A decode step of the hybrid model is, per MoE layer: GPU work (attention, norms, router) -> CPU
routed experts -> GPU again. The GPU work is dozens of small kernels whose launch overhead
rivals their run time, so each layer's GPU segments are captured once as CUDA graphs over
static buffers and replayed every step; the position is a device tensor (static-shape attention,
MLAttention.decode_static), so one capture serves every step.

Per MoE layer:
    A  hidden += attn(norm(hidden)); x = norm2(hidden); router(x); x, ids, weights -> pinned host
    B  shared = shared_experts(x)                 (queued; runs while the CPU does the experts)
    -  host: wait for A's copies, routed = experts(x, ids, weights) -> pinned host
    C  hidden += routed * scale + shared          (upload from pinned memory inside the graph)
Dense layers are one segment, the final norm + lm_head another.

`StaticDecoder(model, use_cuda_graph=True)`: graphs when the step's modules sit on cuda and
`use_cuda_graph`; otherwise the same segments run eagerly (CPU-only machines, tests). Everything a
step runs besides the routed experts and the embedding must sit on one device (`step_devices`).
`step(token_id, position) -> float32 logits [vocab]` on the model's device. The model's cache is shared with
`model.forward`, so prefill with the model, then decode with `step`.
"""

from __future__ import annotations

import time

import torch

from ktransformers.gguf.dequant import dequantize_rows
from ktransformers.models.layers import MoE, run


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

        self.hidden = torch.zeros(1, hidden_size, device=dev, dtype=dt)
        self.position = torch.zeros(1, dtype=torch.int64, device=dev)
        self.logits = torch.zeros(model.config.vocab_size, device=dev, dtype=torch.float32)
        k = model.config.num_experts_per_tok or 1
        self.x_moe = torch.zeros(1, hidden_size, device=dev, dtype=dt)
        self.shared = torch.zeros(1, hidden_size, device=dev, dtype=dt)
        self.routed_dev = torch.zeros(1, hidden_size, device=dev, dtype=torch.float32)
        self.x_host = torch.zeros(1, hidden_size, dtype=torch.float32, pin_memory=pin)
        self.ids_host = torch.zeros(1, k, dtype=torch.int64, pin_memory=pin)
        self.w_host = torch.zeros(1, k, dtype=torch.float32, pin_memory=pin)
        self.routed_host = torch.zeros(1, hidden_size, dtype=torch.float32, pin_memory=pin)

        self.token = torch.zeros(1, dtype=torch.int64, device=dev)
        self.embed_table = self._device_embedding() if self.use_graphs else None

        self.plan = []  # per layer: ("dense", seg) or ("moe", seg_a, seg_b, seg_c, experts)
        for layer in layers:
            if isinstance(layer.mlp, MoE):
                self.plan.append(("moe", self._attn_and_router(layer), self._shared(layer),
                                  self._combine(layer), layer.mlp.experts))
            else:
                self.plan.append(("dense", self._dense(layer)))
        self.head = self._head()
        self.graphs_captured = False

    def _device_embedding(self):
        """The token table decoded once onto the GPU (bf16: 1.8 GB for DeepSeek-V3), so a step does no
        CPU dequantization; None when the embedding is not a quantized table."""
        embed = self.model.model.embed_tokens
        table = getattr(embed, "table", None)
        if table is None:
            return None
        rows, cols = table.shape
        return dequantize_rows(table.raw().to(self.device), table.ggml_type, rows, cols, dtype=self.dtype)

    # -- segments: closures over static buffers ------------------------------------------------
    def _attention(self, layer):
        h = self.hidden
        attn_out = layer.self_attn.decode_static(run(layer.input_layernorm, h), self.position)
        h.copy_(h + attn_out.to(self.device, self.dtype))

    def _dense(self, layer):
        def segment():
            self._attention(layer)
            h = self.hidden
            h.copy_(h + layer.mlp(run(layer.post_attention_layernorm, h)).to(self.device, self.dtype))
        return segment

    def _attn_and_router(self, layer):
        def segment():
            self._attention(layer)
            x = run(layer.post_attention_layernorm, self.hidden)
            self.x_moe.copy_(x)
            ids, weights = run(layer.mlp.gate, x)
            self.x_host.copy_(x.float(), non_blocking=True)
            self.ids_host.copy_(ids, non_blocking=True)
            self.w_host.copy_(weights, non_blocking=True)
        return segment

    def _shared(self, layer):
        shared_experts = layer.mlp.shared_experts

        def segment():
            if shared_experts is not None:
                self.shared.copy_(shared_experts(self.x_moe))
        return segment

    def _combine(self, layer):
        scale = layer.mlp.routed_scaling_factor
        has_shared = layer.mlp.shared_experts is not None

        def segment():
            self.routed_dev.copy_(self.routed_host, non_blocking=True)
            out = self.routed_dev.to(self.dtype) * scale
            if has_shared:
                out = out + self.shared
            self.hidden.copy_(self.hidden + out)
        return segment

    def _head(self):
        def segment():
            h = run(self.model.model.norm, self.hidden)
            self.logits.copy_(run(self.model.lm_head, h).float()[0])
        return segment

    # -- capture -----------------------------------------------------------------------------
    def _capture(self):
        """Warm each segment up on a side stream (as torch asks), then capture it in a shared pool."""
        pool = torch.cuda.graph_pool_handle()
        # the warm-up writes one cache row: use the last one and put it back afterwards
        last = self.model.max_context - 1
        caches = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        saved = [cache[last].clone() for cache in caches]
        self.position.fill_(last)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run_eager()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for cache, row in zip(caches, saved):
            cache[last].copy_(row)

        def capture(fn):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                fn()
            return graph.replay

        plan = []
        for entry in self.plan:
            if entry[0] == "dense":
                plan.append(("dense", capture(entry[1])))
            else:
                plan.append(("moe", capture(entry[1]), capture(entry[2]), capture(entry[3]), entry[4]))
        self.plan, self.head = plan, capture(self.head)
        self.graphs_captured = True

    def _run_eager(self):
        for entry in self.plan:
            if entry[0] == "dense":
                entry[1]()
            else:
                entry[1]()
                entry[2]()
                if self.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()  # the pinned copies must have landed
                self._routed(entry[4])
                entry[3]()
        self.head()

    def _routed(self, experts):
        self.routed_host.copy_(experts(self.x_host, self.ids_host, self.w_host))

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, token_id: int, position: int, profile: dict | None = None) -> torch.Tensor:
        """Logits [vocab] (float32, on the model's device) for `token_id` at `position`; writes that cache row.

        profile: when given, adds per-part seconds ("embed", "dense", "moe_gpu", "experts",
        "combine", "head") measured with a sync after each part (slower; for breakdowns only).
        """
        if not 0 <= position < self.model.max_context:
            raise ValueError(f"position {position} outside the context window of {self.model.max_context} tokens")
        if self.use_graphs and not self.graphs_captured:
            self._capture()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        clock = _Clock(profile, sync)

        if not 0 <= token_id < self.model.config.vocab_size:
            raise ValueError(f"token id {token_id} out of range 0..{self.model.config.vocab_size - 1}")
        if self.embed_table is not None:
            self.token.fill_(token_id)
            torch.index_select(self.embed_table, 0, self.token, out=self.hidden)
        else:
            embedded = self.model.model.embed_tokens(torch.tensor([token_id]))
            self.hidden.copy_(embedded.to(self.device, self.dtype), non_blocking=True)
        self.position.fill_(position)
        clock.lap("embed")
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        for entry in self.plan:
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
            self._routed(experts)
            clock.lap("experts")
            combine()
            clock.lap("combine")
        self.head()
        logits = self.logits.clone()  # never hand out the static buffer itself
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
