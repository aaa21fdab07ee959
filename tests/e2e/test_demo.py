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

EXPECTED_CHECKS = (
    "allowed-path-200",
    "denied-path-403",
    "l4-deny-refused",
    "verdict-once-per-flow",
    "live-policy-change",
    "teardown-clean",
)
CHECK_FIELDS = {"name": str, "dataplane": str, "ok": bool, "detail": str}


@pytest.mark.parametrize("ads", ["delta", "sotw"])
def test_demo_passes_every_check(ads: str) -> None:
    require_local_node()
    result = run_demo(ads=ads)
    by_name = {check.name: check for check in result.checks}
    assert result.ok, result.table()
    for name in EXPECTED_CHECKS:
        assert name in by_name, f"check {name} missing:\n{result.table()}"
        assert by_name[name].ok, by_name[name]


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
    assert {c["name"] for c in document["checks"]} >= set(EXPECTED_CHECKS)
    assert all(c["ok"] for c in document["checks"]), document
