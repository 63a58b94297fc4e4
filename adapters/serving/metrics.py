"""`GET /metrics`: the server's figures in Prometheus' text format (prometheus-client), behind
the API key like every other route.

    adapters_requests_total{route, status, adapter}   HTTP requests as answered
    adapters_queue_depth, adapters_running_rows        the engine, at scrape time
    adapters_time_to_first_token_seconds{adapter}      arrival -> first generated token
    adapters_time_per_output_token_seconds{adapter}    decode time / (tokens - 1)
    adapters_generated_tokens_total{adapter}, adapters_tokens_per_second (last 60 s)
    adapters_adapter_loads_total{tier, outcome}, adapters_adapter_load_seconds{tier},
    adapters_adapter_evictions_total, adapters_resident_adapters{tier}

One registry of collectors per app (a process may hold several servers, as the tests do).
Tiers: every resident adapter is on the device today ("device"); loads read from disk.
"""

from __future__ import annotations

import collections
import threading
import time

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response

from ..generation.decode import Output

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
WINDOW_S = 60.0


class ServerMetrics:
    """The collectors, and the hooks the server calls (`track`, `loaded`)."""

    def __init__(self, svc):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("adapters_requests", "HTTP requests by route, status and "
                                "adapter", ["route", "status", "adapter"], registry=r)
        self.ttft = Histogram("adapters_time_to_first_token_seconds", "From a request's "
                              "arrival to its first generated token", ["adapter"],
                              buckets=LATENCY, registry=r)
        self.per_token = Histogram("adapters_time_per_output_token_seconds", "Decode time "
                                   "per generated token after the first", ["adapter"],
                                   buckets=PER_TOKEN, registry=r)
        self.tokens = Counter("adapters_generated_tokens", "Generated tokens", ["adapter"],
                              registry=r)
        self.loads = Counter("adapters_adapter_loads", "Adapter loads by tier read from and "
                             "outcome", ["tier", "outcome"], registry=r)
        self.load_seconds = Histogram("adapters_adapter_load_seconds", "Adapter load time",
                                      ["tier"], buckets=LATENCY, registry=r)
        self.evictions = Counter("adapters_adapter_evictions", "Adapters evicted for room",
                                 registry=r)
        Gauge("adapters_queue_depth", "Jobs waiting for the engine",
              registry=r).set_function(svc.engine.waiting)
        Gauge("adapters_running_rows", "Requests decoding now",
              registry=r).set_function(lambda: len(svc.engine.running()))
        Gauge("adapters_resident_adapters", "Adapters resident, by tier", ["tier"],
              registry=r).labels("device").set_function(
            lambda: len(svc.registry.names()) + len(svc.heads.names()))
        Gauge("adapters_tokens_per_second", f"Generated tokens per second over the last "
              f"{WINDOW_S:.0f} s", registry=r).set_function(self._rate)
        self._recent: collections.deque = collections.deque()  # (time, tokens) of outputs
        self._lock = threading.Lock()

    def track(self, reqs, base_name: str) -> None:
        """Observe each request's output when it ends (chained to its on_done), labelled by
        its adapter (the base's name for the plain base)."""
        for r in reqs:
            r.on_done = _chain(r.on_done, lambda out, a=r.adapter or base_name: self._done(a, out))

    def _done(self, adapter: str, out: Output) -> None:
        n = len(out.token_ids)
        self.tokens.labels(adapter).inc(n)
        if out.first_token_s is not None:
            self.ttft.labels(adapter).observe(out.first_token_s)
        if out.decode_s is not None and n > 1:
            self.per_token.labels(adapter).observe(out.decode_s / (n - 1))
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / WINDOW_S

    def timed(self, load):
        """`load` (returning the names it evicted) counted, timed and its evictions added."""
        def run():
            t0 = time.perf_counter()
            try:
                evicted = load()
            except BaseException:
                self.loads.labels("disk", "failed").inc()
                raise
            self.loads.labels("disk", "ok").inc()
            self.load_seconds.labels("disk").observe(time.perf_counter() - t0)
            self.evictions.inc(len(evicted or ()))
            return evicted
        return run


def _chain(first, then):
    def both(out):
        if first is not None:
            first(out)
        then(out)
    return both


class _CountRequests:
    """ASGI middleware: each HTTP request counted when its response starts (a plain ASGI
    wrapper: Starlette's BaseHTTPMiddleware would sit between a stream and its client's
    disconnect, which stops a request's rows)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                path = getattr(scope.get("route"), "path", None) or "unmatched"
                if path != "/metrics":
                    adapter = (scope.get("state") or {}).get("adapter") or ""
                    self.metrics.requests.labels(path, str(message["status"]), adapter).inc()
            await send(message)

        return await self.app(scope, receive, counted)


def install(app: FastAPI, svc) -> ServerMetrics:
    """The /metrics route and the request counter; svc.metrics is set."""
    metrics = svc.metrics = ServerMetrics(svc)
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/metrics")
    async def scrape():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
