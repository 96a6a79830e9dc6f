"""CUDA graphs for single-token MLA decode: one captured graph per context-length bucket.

Eager decode launches a few dozen small kernels per layer and is bound by Python/launch overhead;
replaying a captured graph launches them all at once. A graph needs fixed shapes, so the position
lives in a device tensor and each graph scores a fixed number of cache rows (the next power of two
of the context, at least MIN_BUCKET), masking the rows past the position.
"""

import torch

MIN_BUCKET = 256
_pools = {}  # one memory pool per device, shared by all graphs: they replay one at a time


class DecodeGraphs:
    def __init__(self, attention):
        self.attention = attention
        self.x = None  # static input, allocated on first use with the caller's dtype
        self.position = torch.zeros(1, dtype=torch.long, device=attention.device)
        self.graphs = {}  # n_keys -> (graph, static output)

    def _bucket(self, end: int) -> int:
        return min(max(MIN_BUCKET, 1 << (end - 1).bit_length()), self.attention.kv_cache.shape[0])

    def _capture(self, n_keys: int):
        device = self.attention.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up run: also writes this step's (correct) cache row
            self.attention.decode_static(self.x, self.position, n_keys)
        torch.cuda.current_stream(device).wait_stream(side)
        if device not in _pools:
            _pools[device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_pools[device]):
            out = self.attention.decode_static(self.x, self.position, n_keys)
        self.graphs[n_keys] = (graph, out)

    def __call__(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if self.x is None or self.x.dtype != x.dtype:
            self.x, self.graphs = torch.empty_like(x), {}
        self.x.copy_(x)
        self.position.fill_(start_pos)
        n_keys = self._bucket(start_pos + 1)
        if n_keys not in self.graphs:
            self._capture(n_keys)
        graph, out = self.graphs[n_keys]
        graph.replay()
        return out.clone()  # the static output is overwritten by the next replay
