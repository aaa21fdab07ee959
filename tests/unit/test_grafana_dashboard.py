"""The shipped Grafana dashboard (manifests/grafana/) only queries metrics steer exports,
or Envoy's own: a renamed metric must not leave an empty panel behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

from steer.bench.dashboard import Scrape, evaluate
from steer.control.cache import SnapshotCache
from steer.metrics import AgentMetrics, ControlMetrics, ReadAtScrape, ebpf_metrics

DASHBOARD = Path(__file__).parents[2] / "manifests" / "grafana" / "steer-dashboard.json"
NAME = re.compile(r"\b(steer_[a-z_]+|envoy_[a-z_]+)")


def exported() -> set[str]:
    agent = AgentMetrics()
    agent.registry.register(ReadAtScrape(lambda: ebpf_metrics({}, 0, {})))
    control = ControlMetrics(SnapshotCache())
    # Families by their base name (no _total): labelled ones are listed before any sample.
    return {m.name for r in (agent.registry, control.registry) for m in r.collect()}


def test_every_panel_queries_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = exported()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in NAME.findall(target["expr"]):
                if name.startswith("envoy_"):
                    continue
                base = re.sub(r"_(total|bucket|count|sum)$", "", name)
                assert base in families, f"{panel['title']}: {name} is not exported"


def test_the_docs_picture_reads_every_panels_query() -> None:
    # docs/observability-dashboard.png evaluates each panel's own expression: a panel
    # written in a form it does not read would be drawn empty.
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert evaluate(target["expr"], [], 10.0) is not None, panel["title"]


def test_rates_increases_and_quantiles_as_prometheus_computes_them() -> None:
    def scrape(allowed: float, denied: float, buckets: tuple[float, float, float]) -> Scrape:
        requests = "steer_http_requests_total"
        le = {"0.1": buckets[0], "1.0": buckets[1], "+Inf": buckets[2]}
        return {
            (requests, (("policy", "a"), ("verdict", "allowed"))): allowed,
            (requests, (("policy", "a"), ("verdict", "denied"))): denied,
            **{("steer_agent_sync_seconds_bucket", (("le", k),)): v for k, v in le.items()},
        }

    samples = [
        (0.0, scrape(0, 0, (0, 0, 0))),
        (1.0, scrape(10, 2, (1, 3, 4))),
        (2.0, scrape(30, 2, (2, 6, 8))),
    ]
    by_verdict = evaluate(
        "sum by (verdict) (rate(steer_http_requests_total[5m]))", samples, window_s=1.0
    )
    assert by_verdict is not None
    assert {s.label: s.points for s in by_verdict} == {
        "allowed": [(1.0, 10.0), (2.0, 20.0)],
        "denied": [(1.0, 2.0), (2.0, 0.0)],
    }
    denied = evaluate(
        'sum(increase(steer_http_requests_total{verdict="denied"}[1h]))', samples, window_s=10.0
    )
    assert denied is not None and denied[0].points[-1] == (2.0, 2.0)
    (p50,) = evaluate(
        "histogram_quantile(0.5, sum by (le) (rate(steer_agent_sync_seconds_bucket[5m])))",
        samples,
        window_s=10.0,
    ) or [None]
    assert p50 is not None
    # 8 observations by t=2: 2 under 0.1 s, 6 under 1 s; the 4th lies in (0.1, 1].
    assert p50.points[-1] == (2.0, 0.1 + 0.9 * (4 - 2) / (6 - 2))


def test_a_gauge_is_read_as_is_grouped_by_its_labels() -> None:
    def scrape(flows: float, pods: float) -> Scrape:
        pressure = "steer_bpf_map_pressure"
        return {
            (pressure, (("map", "steer_flows"),)): flows,
            (pressure, (("map", "steer_pods"),)): pods,
        }

    samples = [(0.0, scrape(0.5, 0.01)), (1.0, scrape(0.25, 0.02))]
    found = evaluate("max by (map) (steer_bpf_map_pressure)", samples, window_s=10.0)
    assert found is not None
    assert {s.label: s.points for s in found} == {
        "steer_flows": [(0.0, 0.5), (1.0, 0.25)],
        "steer_pods": [(0.0, 0.01), (1.0, 0.02)],
    }


def test_map_fill_is_exported_per_map_with_its_capacity() -> None:
    families = {
        m.name: m for m in ebpf_metrics({}, 0, {"steer_flows": (64, 256), "steer_svc": (0, 0)})
    }
    (flows, empty) = sorted(families["steer_bpf_map_pressure"].samples, key=lambda s: s.value)[::-1]
    assert (flows.labels, flows.value) == ({"map": "steer_flows"}, 0.25)
    assert empty.value == 0.0
    capacities = {s.labels["map"]: s.value for s in families["steer_bpf_map_capacity"].samples}
    assert capacities == {"steer_flows": 256, "steer_svc": 0}
