"""The l4-rules and memory scenarios run end to end on a real local node, at their quick
sizes, and give well-formed results. Their figures are measured, never asserted: only
that they exist and are positive.

Lab names are machine-wide: run these under `flock /run/steer-lab.lock`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from steer.bench import BenchOptions, scenario
from steer.node.envoy import EnvoyError, envoy_binary

pytestmark = pytest.mark.privileged

QUICK = BenchOptions(rounds=1, quick=True)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require_local_node() -> None:
    if os.geteuid() != 0:
        pytest.skip("the local node needs root (network namespaces, iptables, cgroups)")
    try:
        envoy_binary()
    except EnvoyError as exc:
        pytest.skip(str(exc))


def _run(name: str, tmp_path: Path) -> dict[str, Any]:
    """Run one scenario through the registry and check the interface every scenario has."""
    _require_local_node()
    module = scenario(name)
    result: dict[str, Any] = module.run(QUICK)
    assert json.loads(json.dumps(result)) == result  # JSON-able as it stands
    assert result["scenario"] == name
    assert result["rounds"] == 1
    text = module.table(result)
    assert isinstance(text, str)
    assert text.strip()
    png = tmp_path / f"{name}.png"
    module.plot(result, png)
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    return result


def test_l4_rules(tmp_path: Path) -> None:
    result = _run("l4-rules", tmp_path)
    ran = result["sizes"]["ran"]
    # Quick mode runs smaller sizes; the headline keys then report the largest of them.
    assert result["sizes"]["10000_keys_measured_at"] == max(ran)
    keys = {"0", "10000_per_packet", "10000_per_flow"}
    keys |= {f"{size}_{kind}" for size in ran for kind in ("per_packet", "per_flow")}
    for figure in ("bulk_gbps", "small_msgs_per_s"):
        assert set(result[figure]) == keys
        for key in keys:
            low, median = result["min"][figure][key], result[figure][key]
            assert 0 < low <= median <= result["max"][figure][key]
    assert isinstance(result["target"]["met"], bool)


def test_memory(tmp_path: Path) -> None:
    result = _run("memory", tmp_path)
    assert result["pods"] == 50
    assert result["agent_maps_llvm"] is False  # the compile ran in a child, gone since
    assert result["bpf_build_peak_rss_mb"] > result["agent_rss_mb"] / 4
    for process in ("agent", "control"):
        assert result[f"{process}_rss_mb"] > 0
        assert result["max"][f"{process}_rss_mb"] >= result[f"{process}_rss_mb"]
        assert result[f"{process}_peak_rss_mb"] >= result[f"{process}_rss_mb"]
    assert set(result["targets"]) == {"agent_rss_mb <= 200", "control_rss_mb <= 150"}
