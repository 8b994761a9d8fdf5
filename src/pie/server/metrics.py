"""Prometheus /metrics: request latencies measured by the server, runtime gauges read at scrape time.

Histograms (seconds): pie_time_to_first_token, pie_time_per_output_token (a request's decode time /
(output tokens - 1)), pie_inter_token_latency (between streamed chunks), pie_e2e_request_latency.
Gauges per model, from the scheduler's stats at scrape: queued works, running and preempted sequences,
KV pages used / cached / total, prefix-cache hit rate (prefill tokens reused / prefill tokens asked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from pie.server.app import ServerState

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_E2E = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)


class _RuntimeCollector:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self):
        g = {
            "queue": GaugeMetricFamily(
                "pie_num_requests_waiting", "works queued in the scheduler", labels=["model"]
            ),
            "running": GaugeMetricFamily("pie_num_sequences_running", "live sequences", labels=["model"]),
            "preempted": GaugeMetricFamily(
                "pie_num_sequences_preempted", "sequences swapped out or dropped", labels=["model"]
            ),
            "used": GaugeMetricFamily("pie_kv_pages_used", "KV pages in use", labels=["model"]),
            "cached": GaugeMetricFamily(
                "pie_kv_pages_cached", "KV pages held by the prefix cache", labels=["model"]
            ),
            "total": GaugeMetricFamily("pie_kv_pages_total", "KV pages of the device pool", labels=["model"]),
            "hit": GaugeMetricFamily(
                "pie_prefix_cache_hit_rate", "prefill tokens reused / prefill tokens asked", labels=["model"]
            ),
        }
        c = {
            "preemptions": CounterMetricFamily("pie_preemptions", "sequences preempted", labels=["model"]),
            "prefill": CounterMetricFamily(
                "pie_prompt_tokens_computed", "prefill tokens computed", labels=["model"]
            ),
            "decode": CounterMetricFamily("pie_generation_tokens", "tokens decoded", labels=["model"]),
        }
        for name, rt in list(self.state.engine.models.items()):
            s = rt.stats()
            seqs = list(rt.scheduler.seqs.values())
            preempted = sum(1 for q in seqs if q.state != "resident")
            asked = s["tokens_prefilled"] + s["prefix_tokens_reused"]
            g["queue"].add_metric([name], s["queued"])
            g["running"].add_metric([name], len(seqs) - preempted)
            g["preempted"].add_metric([name], preempted)
            g["used"].add_metric([name], s["pages_used"])
            g["cached"].add_metric([name], s["pages_cached"])
            g["total"].add_metric([name], s["pages_total"])
            g["hit"].add_metric([name], s["prefix_tokens_reused"] / asked if asked else 0.0)
            c["preemptions"].add_metric([name], s["preemptions"])
            c["prefill"].add_metric([name], s["tokens_prefilled"])
            c["decode"].add_metric([name], s["tokens_decoded"])
        procs = GaugeMetricFamily("pie_num_processes_running", "running inferlets (WebSocket and HTTP)")
        procs.add_metric([], len(self.state.processes.running()))
        yield from (*g.values(), *c.values(), procs)


class Metrics:
    def __init__(self, state: ServerState) -> None:
        self.registry = CollectorRegistry()  # one per server: tests run several in one process
        r = self.registry
        self.ttft = Histogram(
            "pie_time_to_first_token_seconds",
            "time to first token",
            ["model"],
            buckets=_LATENCY + (60, 120),
            registry=r,
        )
        self.tpot = Histogram(
            "pie_time_per_output_token_seconds",
            "decode time per output token",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "pie_inter_token_latency_seconds",
            "time between streamed chunks",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "pie_e2e_request_latency_seconds", "request latency", ["model"], buckets=_E2E, registry=r
        )
        self.requests = Counter(
            "pie_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "pie_request_prompt_tokens", "prompt tokens of API requests", ["model"], registry=r
        )
        self.output_tokens = Counter(
            "pie_request_output_tokens", "output tokens of API requests", ["model"], registry=r
        )
        r.register(_RuntimeCollector(state))

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def observe(
        self, model: str, t0: float, first: float | None, end: float, gaps: list[float], n_out: int
    ) -> None:
        self.e2e.labels(model).observe(end - t0)
        if first is not None:
            self.ttft.labels(model).observe(first - t0)
            if n_out > 1:
                self.tpot.labels(model).observe((end - first) / (n_out - 1))
        for gap in gaps:
            self.itl.labels(model).observe(gap)
