"""Prometheus metrics: counters and histograms updated per request, gauges read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .activity import Activity
from .batching import BatchWriter
from .later import Later
from .probes import ProbeSampler
from .supervisor import State, Supervisor

disable_created_metrics()  # no `_created` series: they double the output and nobody graphs them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_PENDING = 4096  # requests counted but not added up at most; one more adds them all up at once
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
M = TypeVar("M", Counter, Histogram)


class _Children(Generic[M]):
    """A labelled metric's children, each kept once made: prometheus_client's `labels()` checks the values
    and takes a lock on every call. Exactly as many as the metric's own children (its labels are few)."""

    __slots__ = ("_made", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._made: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._made.get(values)
        if child is None:
            child = self._made[values] = self._metric.labels(*values)
        return child


class _LiveState(Collector):
    """What is true now: in flight, idle, draining, Ollama's state and restarts, GPUs."""

    def __init__(
        self,
        activity: Activity,
        supervisor: Callable[[], Supervisor | None],
        probes: Callable[[], ProbeSampler | None],
    ) -> None:
        self._activity = activity
        self._supervisor = supervisor
        self._probes = probes

    def collect(self) -> Iterator[Metric]:
        figures = self._activity.figures()
        yield GaugeMetricFamily(
            "llmfleet_inflight_requests",
            "Inference and model-management requests in flight (model lists and metadata are not counted)",
            figures.inflight,
        )
        yield GaugeMetricFamily(
            "llmfleet_idle_seconds", "Seconds since the host was last used", figures.idle_seconds
        )
        yield GaugeMetricFamily(
            "llmfleet_draining", "1 while the agent refuses new work", int(figures.draining)
        )
        supervisor = self._supervisor()
        if supervisor is not None:
            state = GaugeMetricFamily(
                "llmfleet_ollama_state", "1 for Ollama's current state", labels=["state"]
            )
            for candidate in State:
                state.add_metric([candidate.value], int(candidate is supervisor.state))
            yield state
            yield CounterMetricFamily(
                "llmfleet_ollama_restarts", "Restarts of Ollama after failures", supervisor.restarts
            )
        probes = self._probes()
        gpu = probes.results.get("gpu") if probes is not None else None
        if gpu is not None and gpu.status == "ok":
            util = GaugeMetricFamily(
                "llmfleet_gpu_utilization_percent", "GPU utilisation", labels=["gpu", "name"]
            )
            used = GaugeMetricFamily(
                "llmfleet_gpu_memory_used_bytes", "GPU memory used", labels=["gpu", "name"]
            )
            total = GaugeMetricFamily("llmfleet_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"])
            for device in gpu.data:
                labels = [str(device["index"]), device["name"]]
                util.add_metric(labels, device["utilization_percent"])
                used.add_metric(labels, device["memory_used_bytes"])
                total.add_metric(labels, device["memory_total_bytes"])
            yield from (util, used, total)


class _Records(Collector):
    """The record writers (usage, audit): what waits in memory, whether the store takes writes, and what
    waits in each spool on local disk."""

    def __init__(self, writers: Callable[[], Sequence[BatchWriter[Any]]]) -> None:
        self._writers = writers

    def collect(self) -> Iterator[Metric]:
        writers = self._writers()
        if not writers:
            return
        pending = GaugeMetricFamily(
            "llmfleet_records_pending",
            "Records in memory, not yet in the store or the spool",
            labels=["records"],
        )
        failing = GaugeMetricFamily(
            "llmfleet_store_failing",
            "1 while the store does not take the writer's records",
            labels=["records"],
        )
        refused = CounterMetricFamily(
            "llmfleet_store_refused_records",
            "Records the store refused for good (bad data), dropped",
            labels=["records"],
        )
        spool_bytes = GaugeMetricFamily(
            "llmfleet_spool_bytes", "Bytes in the spool's files", labels=["spool"]
        )
        spool_records = GaugeMetricFamily(
            "llmfleet_spool_records", "Records in the spool, waiting for the store", labels=["spool"]
        )
        spool_age = GaugeMetricFamily(
            "llmfleet_spool_oldest_age_seconds",
            "Age of the oldest record in the spool, by its own time (0 when empty)",
            labels=["spool"],
        )
        spool_dropped = CounterMetricFamily(
            "llmfleet_spool_dropped",
            "Records dropped because the spool was full (store.spool_max_bytes) or its disk failed",
            labels=["spool"],
        )
        for writer in writers:
            label = [writer.name]
            pending.add_metric(label, writer.pending)
            failing.add_metric(label, int(writer.failing_since is not None))
            refused.add_metric(label, writer.dropped)
            spool = writer.spool
            if spool is not None:
                spool_bytes.add_metric(label, spool.bytes)
                spool_records.add_metric(label, spool.records)
                spool_age.add_metric(label, spool.age())
                spool_dropped.add_metric(label, spool.dropped)
        yield from (pending, failing, refused)
        if any(writer.spool is not None for writer in writers):
            yield from (spool_bytes, spool_records, spool_age, spool_dropped)


class Metrics:
    def __init__(
        self,
        activity: Activity,
        supervisor: Callable[[], Supervisor | None],
        probes: Callable[[], ProbeSampler | None],
        writers: Callable[[], Sequence[BatchWriter[Any]]] = tuple,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "llmfleet_requests",
            "Proxied requests by route, model and status",
            ["route", "model", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "llmfleet_request_duration_seconds",
            "Proxied request duration",
            ["route"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.ttfb = Histogram(
            "llmfleet_time_to_first_byte_seconds",
            "Time to the first byte of Ollama's answer",
            ["route"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "llmfleet_prompt_tokens", "Prompt tokens by model", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "llmfleet_completion_tokens", "Completion tokens by model", ["model"], registry=r
        )
        self.refusals = Counter(
            "llmfleet_refused_requests",
            "Requests refused before reaching Ollama, by reason",
            ["reason"],
            registry=r,
        )
        r.register(_LiveState(activity, supervisor, probes))
        r.register(_Records(writers))
        self._requests = _Children(self.requests)
        self._duration = _Children(self.duration)
        self._ttfb = _Children(self.ttfb)
        self._prompt_tokens = _Children(self.prompt_tokens)
        self._completion_tokens = _Children(self.completion_tokens)
        self._refusals = _Children(self.refusals)
        # requests counted but not yet added up (later.py): added by the timer or before a scrape
        self._pending: list[tuple[str, str, int, float, float | None, int | None, int | None]] = []
        self._later = Later(self._add_pending)

    def count_request(
        self,
        route: str,
        model: str,
        status: int,
        duration: float,
        ttfb: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """One proxied request: its count, duration, time to first byte and tokens. Added up later, with
        others (later.py); a scrape sees every request counted before it."""
        self._pending.append((route, model, status, duration, ttfb, prompt_tokens, completion_tokens))
        if len(self._pending) >= MAX_PENDING or not self._later.put_off():
            self._add_pending()

    def _add_pending(self) -> None:
        pending, self._pending = self._pending, []
        for route, model, status, duration, ttfb, prompt_tokens, completion_tokens in pending:
            self._requests(route, model, str(status)).inc()
            self._duration(route).observe(duration)
            if ttfb is not None:
                self._ttfb(route).observe(ttfb)
            if prompt_tokens:
                self._prompt_tokens(model).inc(prompt_tokens)
            if completion_tokens:
                self._completion_tokens(model).inc(completion_tokens)

    def count_refusal(self, reason: str) -> None:
        self._refusals(reason).inc()

    def render(self) -> bytes:
        self._add_pending()
        return generate_latest(self.registry)
