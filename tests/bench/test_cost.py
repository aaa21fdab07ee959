"""`steer bench cost` runs end to end on a real local node at its quick size (every path,
the sidecar model built in the lab, and a real Envoy's memory for each model) and gives
the interface outside checks rely on. Figures are measured, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from steer.bench.cost import PATHS
from tests.bench.test_l4rules_memory import _run

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]

PATH_KEYS = {"p50_ms", "p99_ms", "cpu_user_us_per_req", "cpu_sys_us_per_req"}


def test_cost_reports_every_path_and_the_envoy_memory_of_both_models(tmp_path: Path) -> None:
    result = _run("cost", tmp_path)
    assert set(result["paths"]) == set(PATHS)
    for path, figures in result["paths"].items():
        assert figures.keys() >= PATH_KEYS, path
        assert figures["p50_ms"] > 0 and figures["cpu_user_us_per_req"] > 0, (path, figures)
    # Every path carried requests, the sidecar model's through its own two Envoys.
    assert all(f["rps"] > 0 for f in result["paths"].values())
    rss = result["envoy_rss_mb"]
    assert set(rss) == {"node", "sidecars"}
    assert rss["node"].keys() == rss["sidecars"].keys() == {"10"}
    assert rss["node"]["10"] > 0 and rss["sidecars"]["10"] > 0
    assert (tmp_path / "cost.png").stat().st_size > 0
