"""Prometheus metrics of the front end (one registry per app, no module globals).

Latencies and token counts are measured here, per request. Engine-side figures (running and
waiting requests, KV usage, graph stats, engine totals) come from the engine's `status`, fetched
when /metrics is scraped, and are exported by a collector from that latest snapshot.

With PROMETHEUS_MULTIPROC_DIR set (`serve --api-servers N`), the per-request metrics live in
prometheus_client's shared files and a scrape of any front-end process sums every process's; the
engine snapshot and the model version are that process's own (fresh from the engine at the scrape)."""

from __future__ import annotations

import os
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from graphserver import defaults

MULTIPROC_ENV = defaults.METRICS_MULTIPROC_ENV

PREFIX = "graphserver"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    """Exports the engine's latest `status` snapshot."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.up = False
        self.model: dict[str, str] = {}  # name, version

    def describe(self) -> list[Metric]:
        return []  # values appear only once a snapshot exists; no fixed description needed

    def collect(self) -> Iterator[Metric]:
        if self.model:  # not a prometheus_client Info: those do not work in multiprocess mode
            yield InfoMetricFamily(f"{PREFIX}_model", "the model served and its weights version", value=self.model)
        yield GaugeMetricFamily(f"{PREFIX}_engine_up", "1 when the last engine status call succeeded",
                                value=1.0 if self.up else 0.0)
        st = self.status
        if not st:
            return
        sched = st.get("scheduler") or {}
        kv = st.get("kv") or {}
        for key, name, doc in (("running", "requests_running", "requests in the engine's running batch"),
                               ("waiting", "requests_waiting", "requests queued in the engine, not yet running")):
            if isinstance(sched.get(key), (int, float)):
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(sched[key]))
        total, used = kv.get("blocks_total"), kv.get("blocks_used")
        if isinstance(total, (int, float)) and isinstance(used, (int, float)):
            yield GaugeMetricFamily(f"{PREFIX}_kv_blocks_total", "paged KV blocks in the arena", value=float(total))
            yield GaugeMetricFamily(f"{PREFIX}_kv_blocks_used", "paged KV blocks in use", value=float(used))
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "fraction of KV blocks in use",
                                    value=float(used) / float(total) if total else 0.0)
        for key in ("preemptions", "finished", "aborted", "prompt_tokens", "generation_tokens", "steps"):
            if isinstance(sched.get(key), (int, float)):
                yield CounterMetricFamily(f"{PREFIX}_engine_{key}", f"engine total: {key}", value=float(sched[key]))
        for key in ("eager_batch_steps", "reloads"):  # engine totals kept beside the graph stats
            v = st.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                yield CounterMetricFamily(f"{PREFIX}_engine_{key}", f"engine total: {key}", value=float(v))
        graphs = st.get("batch_graphs") or {}
        for key, kind in (("graphs", "gauge"), ("graph_bytes", "gauge"), ("capture_ms_p50", "gauge"),
                          ("capture_ms_p99", "gauge"), ("eager_steps", "counter"), ("replays", "counter")):
            v = graphs.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(f"{PREFIX}_batch_graph_{key}", f"engine batch graphs: {key}", value=float(v))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "request arrival to the first generated token reaching the front end",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                             "time between generated tokens reaching the front end, per token",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "request arrival to its last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated for finished requests",
                                         registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "finished generation requests", ["endpoint", "finish_reason"],
                                registry=r)
        self.errors = Counter(f"{PREFIX}_request_errors", "requests answered with an error", ["status"], registry=r)
        self.in_flight = Gauge(f"{PREFIX}_http_requests_in_flight", "generation requests the front end is serving",
                               registry=r, multiprocess_mode="livesum")
        self.engine = _EngineCollector()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir is None:
            r.register(self.engine)
        else:
            # What a scrape reads: every process's files, not this process's registry (that would
            # count its own samples twice), plus this process's engine snapshot.
            self.scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scrape, self.multiprocess_dir)
            self.scrape.register(self.engine)

    def set_model(self, name: str, version: str) -> None:
        self.engine.model = {"name": name, "version": version}

    def set_engine_status(self, status: dict | None) -> None:
        self.engine.up = status is not None
        if status is not None:
            self.engine.status = status

    def render(self) -> bytes:
        return generate_latest(self.registry if self.multiprocess_dir is None else self.scrape)
