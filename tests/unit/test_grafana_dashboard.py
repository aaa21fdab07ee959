"""The shipped Grafana dashboard (manifests/grafana/) only queries metrics steer exports,
or Envoy's own: a renamed metric must not leave an empty panel behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

from steer.control.cache import SnapshotCache
from steer.metrics import AgentMetrics, ControlMetrics, ReadAtScrape, ebpf_metrics

DASHBOARD = Path(__file__).parents[2] / "manifests" / "grafana" / "steer-dashboard.json"
NAME = re.compile(r"\b(steer_[a-z_]+|envoy_[a-z_]+)")


def exported() -> set[str]:
    agent = AgentMetrics()
    agent.registry.register(ReadAtScrape(lambda: ebpf_metrics({}, 0)))
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
