"""A policy Envoy refuses is held back alone, with Envoy's message, and every other change
keeps reaching the node: a real Envoy and the real local control plane over ADS.

steer validates with Envoy's engines, so no policy written today gets a NACK; the test
makes one by rendering a regex Envoy refuses for one host, as a gap in validation would.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

from steer.atomicfile import write_text_atomic
from steer.control.plane import LocalControlPlane
from steer.render import xds as xds_render
from steer.render.xds import ROUTE_TYPE
from steer.source.local import LocalInputs
from tests.e2e.test_xds_envoy import ENVOY, NODE, run_envoy, wait_ready
from tests.samples import policy_yaml

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not os.access(ENVOY, os.X_OK), reason="no envoy binary"),
]

WEB_IP = "10.244.0.3"
WEB_ROUTE = f"steer-dst-{WEB_IP}-32"
REFUSED_HOST = "refused.example"


def host_policy(name: str, host: str) -> str:
    spec = (
        "spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n    rules:\n"
        f"      - http: {{hosts: [{host}]}}\n"
    )
    return policy_yaml(spec, name)


def rbac_names(plane: LocalControlPlane) -> set[str]:
    snapshot = plane.cache.get(NODE)
    assert snapshot is not None
    config = snapshot.get(ROUTE_TYPE)[WEB_ROUTE].virtual_hosts[0].typed_per_filter_config
    per_route = rbac_pb2.RBACPerRoute()
    config["steer.rbac.ingress-allow"].Unpack(per_route)
    return set(per_route.rbac.rules.policies)


async def until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), what


@pytest.fixture
async def plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LocalControlPlane]:
    real = xds_render.host_regex
    monkeypatch.setattr(
        xds_render, "host_regex", lambda host: "(?x)refused" if host == REFUSED_HOST else real(host)
    )
    policies = tmp_path / "policies"
    policies.mkdir()
    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps({"pods": [{"name": "web", "ip": WEB_IP, "labels": {"app": "web"}}]}))
    (policies / "a.yaml").write_text(host_policy("a", "a.example"))
    (policies / "b.yaml").write_text(host_policy("b", "b.example"))
    control = LocalControlPlane(
        LocalInputs(policies, lab), node_id=NODE, status_file=tmp_path / "status.json"
    )
    socket = tmp_path / "xds.sock"
    task = asyncio.create_task(control.run(socket))
    try:
        await until(socket.exists, "the xDS socket")
        async with run_envoy(tmp_path, socket, "delta") as envoy:
            await wait_ready(envoy)
            async with asyncio.timeout(15):
                await control.cache.wait_for_ack(NODE)
            yield control
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def acked(plane: LocalControlPlane) -> bool:
    snapshot, status = plane.cache.get(NODE), plane.cache.status(NODE)
    assert snapshot is not None
    return status.acked.get(ROUTE_TYPE) == snapshot.version(ROUTE_TYPE)


async def test_a_refused_policy_is_held_back_alone_and_other_changes_flow(
    plane: LocalControlPlane, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    assert {n.split(":", 1)[1].split("/")[1] for n in rbac_names(plane)} >= {"a", "b"}

    write_text_atomic(policies / "b.yaml", host_policy("b", REFUSED_HOST))
    await until(lambda: plane.quarantine.report() != [], "b held back")
    [held] = plane.quarantine.report()
    assert held["policy"] == "default/b"
    assert held["reason"].strip(), "Envoy's message travels with the hold"
    await until(lambda: acked(plane), "Envoy accepting everything but b")
    assert not any("default/b/" in n for n in rbac_names(plane))
    assert any("default/a/" in n for n in rbac_names(plane))

    def reported() -> bool:
        status = json.loads((tmp_path / "status.json").read_text())
        return any("default/b" in e and "Envoy refused" in e for e in status["errors"]) and (
            [h["policy"] for h in status["quarantined"]] == ["default/b"]
        )

    # The status file is written every 100 ms.
    await until(reported, "b reported in the control plane's status")

    # An unrelated change is not stuck behind the refused policy.
    write_text_atomic(policies / "c.yaml", host_policy("c", "c.example"))
    await until(
        lambda: acked(plane) and any("default/c/" in n for n in rbac_names(plane)),
        "c programmed while b is held",
    )

    # Fixed, b is tried again and goes through.
    write_text_atomic(policies / "b.yaml", host_policy("b", "b2.example"))
    await until(
        lambda: acked(plane) and any("default/b/" in n for n in rbac_names(plane)),
        "the fixed b programmed",
    )
    assert plane.quarantine.report() == []
