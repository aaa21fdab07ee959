"""The propagation and l7-rules scenarios run end to end on a real local node at their quick
sizes and give well-formed results. Figures are measured, never asserted: only that they
exist and are positive, and what the workload itself fixes (which resources a change moves).

Lab names are machine-wide: run these under `flock /run/steer-lab.lock`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from steer.bench import BenchOptions, scenario
from steer.bench.l7rules import CONFIGS
from steer.bench.propagation import MODES
from tests.bench.test_render_datapath import check_output
from tests.e2e.conftest import require_local_node

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]

QUICK = BenchOptions(rounds=1, quick=True)


def _run(name: str, tmp_path: Path) -> dict[str, Any]:
    require_local_node()
    result: dict[str, Any] = scenario(name).run(QUICK)
    assert json.loads(json.dumps(result)) == result  # JSON-able as it stands
    check_output(name, result, tmp_path)
    return result


def test_propagation_times_changes_over_both_ads_flavours(tmp_path: Path) -> None:
    result = _run("propagation", tmp_path)
    assert (result["pods"], result["rules"]) == (50, 500)
    assert result["changes"] >= 5
    assert set(result["mode"]) == set(MODES)
    for key in ("p50_ms", "p99_ms", "bytes_per_change"):
        assert set(result[key]) == set(MODES)
        assert all(value > 0 for value in result[key].values())
    for figures in result["mode"].values():
        assert len(figures["latencies_ms"]) == figures["changes"] == result["changes"]
        assert figures["p99_ms"] >= figures["p50_ms"] > 0
        assert figures["pushes_per_change"] > 0
        assert figures["nacks"] == 0
    # Flipping one rule on web moves web's route configuration and nothing else: RDS, not
    # LDS, is what reaches keep-alive connections.
    assert result["bytes_detail"]["changed_types"] == ["RouteConfiguration"]
    assert result["bytes_detail"]["changed_resources"] == 1


def test_l7_rules_reports_each_configuration(tmp_path: Path) -> None:
    result = _run("l7-rules", tmp_path)
    for key in ("p50_ms", "p99_ms"):
        assert set(result[key]) == set(CONFIGS)
        assert all(value > 0 for value in result[key].values())
    assert result["sizes"]["10"] == {"here": 10, "elsewhere": 0}
    assert result["sizes"]["10000_elsewhere"] == {"here": 10, "elsewhere": 1000}
    assert result["sizes"]["1000_here"] == {"here": 100, "elsewhere": 0}
    assert result["ratio_to_10"]["10"] == 1.0
