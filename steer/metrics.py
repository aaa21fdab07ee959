"""Prometheus metrics of the agent and the control plane (prometheus_client), named as
Prometheus asks: `steer_` prefix, base units, `_total` on counters.

Each process has its own registry, so that tests can run several in one interpreter.
Values the process already keeps (the eBPF counters, the xDS bookkeeping) are read at
scrape time by a collector, never copied on every change.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from steer.constants import CONTROL_METRICS_PORT

log = logging.getLogger("steer.metrics")
Fetch = Callable[[], tuple[int, str]]
# Seconds: from a change being read to the node enforcing it, or to Envoy's ACK.
PROPAGATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """What one node's agent counts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.http_requests = Counter(
            "steer_http_requests",
            "HTTP requests through the node's Envoy, by verdict, the client's datapath, "
            "direction (egress: the client is on this node) and the deciding policy",
            ["verdict", "dataplane", "direction", "policy"],
            registry=self.registry,
        )
        self.flows = Counter(
            "steer_flows",
            "TCP flows opened by steered pods, and into them from elsewhere (direction "
            "ingress; one per refused packet), by verdict, datapath, direction and deciding "
            "policy (each counted once, when its event reaches the agent)",
            ["verdict", "dataplane", "direction", "policy"],
            registry=self.registry,
        )
        self.inbound_events_lost = Counter(
            "steer_inbound_events_lost",
            "Events of flows from elsewhere that netfilter could not hand over, by source: "
            "nflog (refused packets, counted exactly), conntrack (socket overruns: at "
            "least one event each) and conntrack_new (open events: overruns of new-flow "
            "events, and flows found at start-up past the cap)",
            ["source"],
            registry=self.registry,
        )
        self.revocations = Counter(
            "steer_revocations",
            "Live flows cut because a policy change changed their verdict",
            registry=self.registry,
        )
        self.syncs = Counter(
            "steer_agent_syncs",
            "Agent syncs of the datapath, by result (ok, error)",
            ["result"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}
        self.sync_seconds = Histogram(
            "steer_agent_sync_seconds",
            "Time from reading a change to the node's datapath enforcing it",
            buckets=PROPAGATION_BUCKETS,
            registry=self.registry,
        )

    def observe_events(self, events: Sequence[dict[str, Any]]) -> None:
        """Count a batch: one increment per distinct label set, not per event. The flows
        of one shape arrive as one shared dict each, counted without a look inside."""
        by_object = collections.Counter(map(id, events))
        objects = dict(zip(map(id, events), events, strict=True))
        counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        for identity, count in by_object.items():
            event = objects[identity]
            label_set: tuple[str, ...] = (
                str(event.get("layer")),
                event.get("verdict") or "unknown",
                event.get("dataplane") or "none",
                event.get("direction") or "none",
                event.get("policy") or "none",
            )
            counts[label_set] += count
        for key, count in counts.items():
            child = self._children.get(key)
            if child is None:  # looking a child up costs more than counting
                layer, *labels = key
                family = self.flows if layer == "l4" else self.http_requests
                child = self._children[key] = family.labels(*labels)
            child.inc(count)

    def inbound_lost(self, source: str, count: int) -> None:
        self.inbound_events_lost.labels(source).inc(count)

    def observe_sync(self, seconds: float, revoked: int, errors: int) -> None:
        self.syncs.labels("error" if errors else "ok").inc()
        self.sync_seconds.observe(seconds)
        if revoked:
            self.revocations.inc(revoked)


class ReadAtScrape(Collector):
    """Metrics read from the process's own state when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._read()
        except Exception:  # a scrape must never take the process down
            log.exception("reading metrics failed")


def ebpf_metrics(
    counters: dict[str, dict[str, int]],
    evicted: int,
    map_fill: Mapping[str, tuple[int, int]],
) -> list[Metric]:
    """The eBPF datapath's per-pod counters, summed over the node's pods, and how full
    its maps are (`map_fill`: name -> (entries, capacity))."""
    totals: dict[str, int] = {}
    for per_pod in counters.values():
        for name, value in per_pod.items():
            totals[name] = totals.get(name, 0) + value
    connects = CounterMetricFamily(
        "steer_ebpf_connects",
        "Connects of eBPF-steered pods decided by connect4, by verdict",
        labels=["verdict"],
    )
    for verdict, name in (("l7", "redirects"), ("allowed", "direct"), ("denied", "denied")):
        connects.add_metric([verdict], totals.get(name, 0))
    return [
        connects,
        CounterMetricFamily(
            "steer_ebpf_skmsg_bytes",
            "Bytes sk_msg handed straight to the peer socket",
            value=totals.get("bytes", 0),
        ),
        CounterMetricFamily(
            "steer_ebpf_map_full",
            "Map updates that failed in the kernel (steering degraded; see the agent log)",
            value=totals.get("map_full", 0),
        ),
        CounterMetricFamily(
            "steer_ebpf_service_balanced",
            "Connects to a Service balanced to a backend by connect4",
            value=totals.get("svc_balanced", 0),
        ),
        CounterMetricFamily(
            "steer_ebpf_events_lost",
            "Flow events the kernel's ring buffer had no room for (counted, never silent)",
            value=totals.get("events_lost", 0),
        ),
        CounterMetricFamily(
            "steer_observe_events_evicted",
            "Events pushed out of the agent's ring before `steer observe` read them",
            value=evicted,
        ),
        GaugeMetricFamily("steer_ebpf_pods", "Pods on the eBPF datapath", value=len(counters)),
        *_map_fill_metrics(map_fill),
    ]


def _map_fill_metrics(map_fill: Mapping[str, tuple[int, int]]) -> list[Metric]:
    entries = GaugeMetricFamily(
        "steer_bpf_map_entries", "Entries in each BPF map that can fill up", labels=["map"]
    )
    capacity = GaugeMetricFamily(
        "steer_bpf_map_capacity", "Entries each BPF map can hold", labels=["map"]
    )
    # As Cilium's bpf_map_pressure: alert well before 1, where new flows lose steering
    # (steer_ebpf_map_full_total counts those) or LRU maps evict live flows' entries.
    pressure = GaugeMetricFamily(
        "steer_bpf_map_pressure", "Entries over capacity, 0 to 1", labels=["map"]
    )
    for name, (count, size) in sorted(map_fill.items()):
        entries.add_metric([name], count)
        capacity.add_metric([name], size)
        pressure.add_metric([name], count / size if size else 0.0)
    return [entries, capacity, pressure]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return  # a scrape every few seconds is not worth a log line


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(
    registry: CollectorRegistry,
    port: int,
    *,
    address: str = "0.0.0.0",
    envoy_stats: Fetch | None = None,
) -> Callable[[], None]:
    """Serve `/metrics` (and, given `envoy_stats`, Envoy's own at `/stats/prometheus`, read
    from its admin socket, which stays private) in a thread; returns the stop function."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/stats/prometheus" and envoy_stats is not None:
            try:
                status, body = envoy_stats()
            except OSError as exc:
                status, body = 503, f"Envoy's admin is not reachable: {exc}\n"
            code = "200 OK" if status == 200 else "503 Service Unavailable"
            start_response(code, [("Content-Type", "text/plain; version=0.0.4")])
            return [body.encode()]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(address, port, app, _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="steer-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


class ControlMetrics:
    """What the control plane counts: xDS traffic per node (read from its cache at scrape
    time), render times, and how long a snapshot takes to be accepted by a node."""

    def __init__(self, cache: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.render_seconds = Histogram(
            "steer_render_seconds",
            "Time to render the nodes' Envoy configuration after a change",
            buckets=PROPAGATION_BUCKETS,
            registry=self.registry,
        )
        self.propagation_seconds = Histogram(
            "steer_policy_propagation_seconds",
            "Time from a node's new configuration to its Envoy accepting all of it",
            buckets=PROPAGATION_BUCKETS,
            registry=self.registry,
        )
        cache.on_propagated = lambda node, seconds: self.propagation_seconds.observe(seconds)
        self.registry.register(ReadAtScrape(lambda: xds_metrics(cache)))


def xds_metrics(cache: Any) -> list[Metric]:
    """Per node: pushes, ACKs, NACKs and open ADS streams."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
        "pushes": CounterMetricFamily(
            "steer_xds_pushes", "xDS responses sent, per node", labels=["node"]
        ),
        "acks": CounterMetricFamily(
            "steer_xds_acks", "xDS responses a node accepted", labels=["node"]
        ),
        "nacks": CounterMetricFamily(
            "steer_xds_nacks", "xDS responses a node refused (see steer status)", labels=["node"]
        ),
        "streams": GaugeMetricFamily(
            "steer_xds_streams", "ADS streams open, per node", labels=["node"]
        ),
    }
    for node in cache.nodes():
        status = cache.status(node)
        for name, family in families.items():
            family.add_metric([node], getattr(status, name))
    return list(families.values())


def serve_control_metrics(metrics: ControlMetrics) -> Callable[[], None] | None:
    """The control plane's `/metrics`; None (logged) when its port is taken."""
    try:
        return serve_metrics(metrics.registry, CONTROL_METRICS_PORT)
    except OSError as exc:
        log.error("metrics are unavailable on port %d: %s", CONTROL_METRICS_PORT, exc)
        return None
