"""`steer demo` end to end, over both ADS flavours and through the command line.

Each demo brings up (and tears down) its own local node, so this module must not share a
run with the `node` fixture: it never asks for it, and module-scoped fixtures of other
modules are finalized before this module starts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steer.demo import run_demo
from tests.e2e.conftest import require_local_node

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]

COMMON_CHECKS = (
    "allowed-path-200",
    "denied-path-403",
    "observe-names-the-rules",
    "explain-agrees",
    "l4-deny-refused",
    "flow-events-name-the-process",
    "verdict-once-per-flow",
    "l4-only-without-envoy",
    "live-policy-change",
)
EBPF_CHECKS = ("skmsg-counters-grew", "veth-carries-no-payload")
CHECK_FIELDS = {"name": str, "dataplane": str, "ok": bool, "detail": str}


@pytest.mark.parametrize(
    ("dataplane", "ads", "expected"),
    [
        ("iptables", "sotw", {("iptables", c) for c in COMMON_CHECKS}),
        ("ebpf", "delta", {("ebpf", c) for c in (*COMMON_CHECKS, *EBPF_CHECKS)}),
    ],
)
def test_demo_passes_every_check_on_each_datapath(
    dataplane: str, ads: str, expected: set[tuple[str, str]]
) -> None:
    require_local_node()
    result = run_demo(dataplane=dataplane, ads=ads)
    assert result.ok, result.table()
    ran = {(check.dataplane, check.name) for check in result.checks}
    assert expected <= ran, f"missing {expected - ran}:\n{result.table()}"
    assert "teardown-clean" in {c.name for c in result.checks}, result.table()


def test_demo_cli_prints_checks_as_json() -> None:
    require_local_node()
    done = subprocess.run(
        [sys.executable, "-m", "steer.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert set(document) == {"ok", "checks"}
    assert document["ok"] is True
    assert isinstance(document["checks"], list)
    for check in document["checks"]:
        assert {key: type(value) for key, value in check.items()} == CHECK_FIELDS, check
    # The default runs both datapaths, the client switching from iptables to eBPF.
    ran = {(c["dataplane"], c["name"]) for c in document["checks"]}
    assert {("iptables", c) for c in COMMON_CHECKS} <= ran
    assert {("ebpf", c) for c in (*COMMON_CHECKS, *EBPF_CHECKS)} <= ran
    assert ("ebpf", "switch-keeps-connections") in ran
    assert all(c["ok"] for c in document["checks"]), document
