"""The server's Prometheus metrics (`GET /metrics`), with the `prometheus-client` library.

Each app owns a `CollectorRegistry` of its own (not the process-wide one), so two
apps in one process (tests, replicas behind one front) never share or clash over
series. Counters and histograms are fed by the HTTP layer as requests end; the
engine's state (queue, slots, compiled programs, device calls) is read from
`Engine.stats` at scrape time by a collector, so a scrape is one consistent snapshot.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# the routes served; any other path is counted as "other" (a scanner's paths must not grow the series)
ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
# seconds: a lone short answer on a CPU takes ~0.05 s, a queued one on a loaded server can take minutes
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENGINE_OUTCOMES = ("submitted", "completed", "cancelled", "rejected", "failed")

CONTENT_TYPE = CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    """The `endpoint` label of a request path: a served route, else "other"."""
    return path if path in ENDPOINTS else "other"


class ServerMetrics:
    """The series of one server; `scrape` renders them in the Prometheus text format."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdjax_requests", "HTTP requests by endpoint and status (499: the client left "
                                "before the response was complete)", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("pdjax_prompt_tokens", "prompt tokens of answered chat completions", registry=r)
        self.completion_tokens = Counter("pdjax_completion_tokens", "completion tokens of answered chat completions",
                                         registry=r)
        self.model_calls = Counter("pdjax_model_calls", "model calls (the decoder's model_calls) of answered chat "
                                   "completions", registry=r)
        self.latency = Histogram("pdjax_request_duration_seconds", "answered chat completions: request received to "
                                 "last byte sent, queueing included", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pdjax_time_to_first_token_seconds", "answered chat completions: request received to "
                              "the first response token final", buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def request_ended(self, record: Any) -> None:
        """Count one request (an `access.RequestRecord` whose response has ended)."""
        self.requests.labels(endpoint_label(record.path), str(record.status_label)).inc()
        if record.answered and not record.client_left:
            self.prompt_tokens.inc(record.prompt_tokens)
            self.completion_tokens.inc(record.completion_tokens)
            self.model_calls.inc(record.model_calls)
            self.latency.observe(record.latency)
            if record.first_token is not None:
                self.ttft.observe(record.first_token)

    def scrape(self) -> bytes:
        """Every series, in the Prometheus text exposition format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's state at scrape time: queue length, slots busy and in all, compiled programs, device calls,
    and its request outcomes."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        stats = self.engine.stats()
        slots = self.engine.config.batch_size * stats.get("replicas", 1)
        yield GaugeMetricFamily("pdjax_queue_length", "requests waiting for a slot", value=stats["waiting"])
        yield GaugeMetricFamily("pdjax_slots_busy", "decode slots holding a request", value=stats["running"])
        yield GaugeMetricFamily("pdjax_slots", "decode slots in all (batch size x replicas)", value=slots)
        yield GaugeMetricFamily("pdjax_compiled_programs", "serving programs compiled (per replica); more than 1 "
                                "means a recompile", value=stats["compiled_programs"])
        yield CounterMetricFamily("pdjax_engine_steps", "device calls of the serving program (each runs up to "
                                  "--chunk decoding iterations over every slot)", value=stats["steps"])
        outcomes = CounterMetricFamily("pdjax_engine_requests", "requests the engine accepted (submitted) and how "
                                       "they ended; rejected: refused with a full queue", labels=["outcome"])
        for outcome in ENGINE_OUTCOMES:
            outcomes.add_metric([outcome], stats[outcome])
        yield outcomes
