"""GET /metrics in Prometheus' text format (prometheus-client), one registry per app so that several
apps in one process (tests, benchmarks) never share counters.

Requests are counted by route and status after every response; a generation is recorded once, when its
RunningJob closes (jobs.py): its tokens, its speeds and how long its first token took from the moment the
request arrived (queue, tokenizing and prefill included).
"""

from __future__ import annotations

import time

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

RECEIVED_AT = "ktransformers.received_at"   # request.environ key: time.monotonic() when the request arrived
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
RATE_BUCKETS = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)   # tokens per second


class ServerMetrics:
    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ktransformers_requests", "HTTP requests answered", ["route", "status"],
                                registry=registry)
        self.generations = Counter("ktransformers_generations", "Generations ended, by finish reason "
                                   "(unfinished: the client left, the server stopped or failed)", ["finish_reason"],
                                   registry=registry)
        self.prompt_tokens = Counter("ktransformers_prompt_tokens", "Prompt tokens of finished generations",
                                     registry=registry)
        self.cached_tokens = Counter("ktransformers_cached_prompt_tokens",
                                     "Prompt tokens reused from the prefix cache (not prefilled)", registry=registry)
        self.completion_tokens = Counter("ktransformers_completion_tokens", "Generated tokens", registry=registry)
        self.ttft = Histogram("ktransformers_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", buckets=TTFT_BUCKETS,
                              registry=registry)
        self.prefill_rate = Histogram("ktransformers_prefill_tokens_per_second",
                                      "Prompt tokens evaluated per second, per generation", buckets=RATE_BUCKETS,
                                      registry=registry)
        self.decode_rate = Histogram("ktransformers_decode_tokens_per_second",
                                     "Tokens decoded per second after the first, per generation", buckets=RATE_BUCKETS,
                                     registry=registry)
        Gauge("ktransformers_queue_waiting", "Requests waiting for the model", registry=registry
              ).set_function(lambda: engine.waiting)
        Gauge("ktransformers_queue_size", "Requests that may wait (--queue_size)", registry=registry
              ).set_function(lambda: engine.queue_size)
        Gauge("ktransformers_busy", "1 while the model is generating", registry=registry
              ).set_function(lambda: float(engine.busy))
        Gauge("ktransformers_running", "Requests generating now (at most --max_batch)", registry=registry
              ).set_function(lambda: len(engine.running))
        Gauge("ktransformers_max_batch", "Requests that may generate at once (--max_batch)", registry=registry
              ).set_function(lambda: engine.max_batch)
        registry.register(_DecodePasses(engine))

    def generation_done(self, run) -> None:
        """`run` is the closing RunningJob (jobs.py)."""
        finish = run.finish
        if run.first_token_at is not None:
            self.ttft.observe(run.first_token_at - run.received_at)
        self.completion_tokens.inc(run.completion_tokens)
        if finish is None:
            self.generations.labels("unfinished").inc()
            return
        self.generations.labels(finish.finish_reason).inc()
        self.prompt_tokens.inc(finish.prompt_tokens)
        self.cached_tokens.inc(finish.cached_tokens)
        if finish.prompt_tokens > finish.cached_tokens and finish.prefill_tokens_per_s > 0:
            self.prefill_rate.observe(finish.prefill_tokens_per_s)
        if finish.decode_tokens_per_s > 0:
            self.decode_rate.observe(finish.decode_tokens_per_s)


class _DecodePasses:
    """Decode passes by how many sequences shared them, read from the engine at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        family = CounterMetricFamily("ktransformers_decode_passes", "Decode passes, by sequences batched in the pass",
                                     labels=["sequences"])
        for size, count in sorted(self.engine.decode_batch_sizes.items()):
            family.add_metric([str(size)], count)
        yield family


def install_metrics(app: Flask, engine) -> ServerMetrics:
    """Add GET /metrics and the per-request accounting to `app`; `app.config["KT_METRICS"]` holds them."""
    metrics = app.config["KT_METRICS"] = ServerMetrics(engine)

    @app.before_request
    def _arrived():
        request.environ[RECEIVED_AT] = time.monotonic()

    @app.after_request
    def _count(response):
        route = request.url_rule.rule if request.url_rule is not None else "unknown"   # bounded label values
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    return metrics
