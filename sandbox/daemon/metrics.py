"""Prometheus metrics of one daemon, on a registry of its own (several apps can live in a process).

Counters and histograms are updated as executions finish; the figures that are a property of
the moment (zygotes up, circuit states, queue depth) are read from the daemon on each scrape, so
they can never go stale.

Every label value comes from a bounded set the operator controls: skill ids of loaded skills
(any other id a caller sends is counted under `other`), route templates, status codes, fixed
reasons. Nothing a caller chooses becomes a label, so callers cannot grow /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.protocol import ExecutionResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_CPU_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: The label for executions of skills that are not loaded (unknown ids, unloaded meanwhile).
OTHER = "other"
_MEMORY_BUCKETS = tuple(float(mb << 20) for mb in (1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096))
CIRCUIT_STATES = ("closed", "open", "half_open")


@dataclass
class Snapshot:
    """What the scrape-time collector needs from the daemon right now."""

    zygotes_up: dict[str, bool] = field(default_factory=dict)
    circuits: dict[str, str] = field(default_factory=dict)
    inflight: int = 0
    running: int = 0
    queued: int = 0
    queue_limit: int = 0
    tenants_tracked: int | None = None
    draining: bool = False
    #: zygotes started and alive; started and found dead (not yet restarted)
    zygotes_live: int = 0
    zygotes_down: list[str] = field(default_factory=list)
    cold_starts: int = 0
    evictions: int = 0


class _LiveCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        up = GaugeMetricFamily("skill_sandbox_zygote_up",
                               "1 when the skill's zygote (fork server) is alive (0 while "
                               "cold or evicted: see skill_sandbox_zygotes_live)",
                               labels=["skill"])
        for skill, alive in sorted(snap.zygotes_up.items()):
            up.add_metric([skill], 1.0 if alive else 0.0)
        circuit = GaugeMetricFamily("skill_sandbox_circuit_state",
                                    "1 for the current circuit-breaker state of each skill",
                                    labels=["skill", "state"])
        for skill, state in sorted(snap.circuits.items()):
            for name in CIRCUIT_STATES:
                circuit.add_metric([skill, name], 1.0 if state == name else 0.0)
        yield up
        yield circuit
        yield GaugeMetricFamily("skill_sandbox_skills_loaded", "skills loaded",
                                value=len(snap.zygotes_up))
        yield GaugeMetricFamily("skill_sandbox_zygotes_live",
                                "zygotes running now (skills loaded but cold or evicted have "
                                "none)", value=snap.zygotes_live)
        yield CounterMetricFamily("skill_sandbox_zygote_cold_starts",
                                  "zygotes started for a skill that had none running (first "
                                  "use, warm at load, or after an eviction)",
                                  value=snap.cold_starts)
        yield CounterMetricFamily("skill_sandbox_zygote_evictions",
                                  "idle zygotes stopped to keep to max_zygotes or "
                                  "zygote_idle_ttl", value=snap.evictions)
        yield GaugeMetricFamily("skill_sandbox_inflight_executions",
                                "executions accepted and not yet answered", value=snap.inflight)
        yield GaugeMetricFamily("skill_sandbox_running_executions",
                                "executions running in a worker", value=snap.running)
        yield GaugeMetricFamily("skill_sandbox_queue_depth",
                                "executions waiting for a concurrency slot", value=snap.queued)
        yield GaugeMetricFamily("skill_sandbox_queue_limit",
                                "requests in flight (running + queued) beyond which new ones get "
                                "429 queue_full: max_concurrency + max_queue",
                                value=snap.queue_limit)
        if snap.tenants_tracked is not None:
            yield GaugeMetricFamily("skill_sandbox_policy_tenants_tracked",
                                    "tenants with rate-limit or concurrency state in the policy "
                                    "(idle ones are evicted)", value=snap.tenants_tracked)
        yield GaugeMetricFamily("skill_sandbox_draining", "1 while shutting down",
                                value=1.0 if snap.draining else 0.0)


class Metrics:
    """The daemon's metrics; `observe` is called once per finished execution."""

    def __init__(self, snapshot: Callable[[], Snapshot],
                 loaded: Callable[[str], bool] = lambda skill_id: True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._loaded = loaded
        #: listener name -> open connections, filled in by the server once it listens
        self.open_connections: dict[str, Callable[[], int]] = {}
        registry = self.registry
        self.executions = Counter("skill_sandbox_executions", "finished executions",
                                  ["skill", "status"], registry=registry)
        self.duration = Histogram("skill_sandbox_execution_duration_seconds",
                                  "wall-clock time from admission to result", ["skill"],
                                  buckets=_LATENCY_BUCKETS, registry=registry)
        self.cpu = Histogram("skill_sandbox_execution_cpu_seconds",
                             "CPU time of the execution's process tree", ["skill"],
                             buckets=_CPU_BUCKETS, registry=registry)
        self.memory = Histogram("skill_sandbox_execution_memory_bytes",
                                "peak memory above the worker's baseline", ["skill"],
                                buckets=_MEMORY_BUCKETS, registry=registry)
        self.plans = Counter("skill_sandbox_plans", "finished execution plans", ["outcome"],
                             registry=registry)
        self.zygote_restarts = Counter("skill_sandbox_zygote_restarts",
                                       "zygotes found dead and restarted", ["skill"],
                                       registry=registry)
        self.reloads = Counter("skill_sandbox_reloads", "skill/policy reloads", ["outcome"],
                               registry=registry)
        self.http_requests = Counter("skill_sandbox_http_requests", "HTTP requests answered",
                                     ["route", "code"], registry=registry)
        self.rejected_requests = Counter("skill_sandbox_rejected_requests",
                                         "HTTP requests refused before reaching a worker",
                                         ["reason"], registry=registry)
        self.queue_wait = Histogram("skill_sandbox_queue_wait_seconds",
                                    "time an admitted execution waited for a concurrency slot",
                                    buckets=_QUEUE_BUCKETS, registry=registry)
        self.connections_refused = Counter("skill_sandbox_connections_refused",
                                           "connections closed at once: the listener had "
                                           "max_connections open", ["listener"],
                                           registry=registry)
        self.connections_timed_out = Counter("skill_sandbox_connections_timed_out",
                                             "connections closed because the request head or "
                                             "body did not arrive in time",
                                             ["listener", "phase"], registry=registry)
        registry.register(_LiveCollector(snapshot))
        registry.register(_ConnectionCollector(self))

    def connection_refused(self, listener: str) -> None:
        self.connections_refused.labels(listener).inc()

    def connection_timed_out(self, listener: str, phase: str) -> None:
        self.connections_timed_out.labels(listener, phase).inc()

    def skill_label(self, skill_id: str) -> str:
        """`skill_id` if that skill is loaded, else `other`: callers cannot mint labels."""
        return skill_id if skill_id and self._loaded(skill_id) else OTHER

    def observe(self, result: ExecutionResult) -> None:
        skill = self.skill_label(result.skill_id)
        self.executions.labels(skill, result.status.value).inc()
        self.duration.labels(skill).observe(result.duration)
        usage = result.resource_usage
        self.cpu.labels(skill).observe(usage.cpu_time_ms / 1000.0)
        self.memory.labels(skill).observe(float(usage.memory_mb << 20))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ConnectionCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("skill_sandbox_open_connections",
                                   "connections open on each listener", labels=["listener"])
        for name, count in sorted(self._metrics.open_connections.items()):
            family.add_metric([name], float(count()))
        yield family


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample's value from Prometheus text (for `status`, tests and scripts)."""
    for line in _samples(text):
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        found = dict(_parse_labels(label_text.rstrip("}")))
        if all(found.get(key) == expected for key, expected in (labels or {}).items()):
            return float(value)
    return None


def _samples(text: str) -> Iterator[str]:
    for line in text.splitlines():
        if line and not line.startswith("#"):
            yield line


def _parse_labels(text: str) -> Iterator[tuple[str, str]]:
    for part in filter(None, text.split('",')):
        key, _, value = part.partition("=")
        yield key.strip(","), value.strip('"')
