"""End-to-end fixtures: one local node (lab, control plane, agent, real Envoy) per module.

Network namespace names are global, so only one local node can run at a time: the node is
module-scoped, and a module that runs its own node (the demo) must not ask for this one.
Teardown happens even when a test fails: `LocalNode.start` removes the lab on any exit,
and the servers stop before the node goes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from steer.demo import leftovers
from steer.localnode import LocalNode
from steer.testing.servers import serve

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"
HTTP_PORT = 8080
HTTP_PODS = ("web", "api")


def require_local_node() -> None:
    """Skip (not fail) where the local node cannot run at all."""
    if os.geteuid() != 0:
        pytest.skip("the local node needs root (network namespaces, iptables, cgroups)")
    if not ENVOY.exists():
        pytest.skip(f"no envoy binary at {ENVOY}")
    if left := leftovers():
        pytest.fail(f"another local node is up or was left behind: {', '.join(left)}")


@pytest.fixture(scope="module")
def node() -> Iterator[LocalNode]:
    """The default lab (client, web, api in `default`, labelled app=<name>), fully synced."""
    require_local_node()
    with LocalNode.start() as running:
        yield running
    assert not leftovers(), f"the local node left state behind: {leftovers()}"


@pytest.fixture(scope="module")
def http_servers(node: LocalNode) -> Iterator[None]:
    """An HTTP server on web:8080 and api:8080 that answers with who it is and who called."""
    with ExitStack() as servers:
        for name in HTTP_PODS:
            pod = node.lab.pod("default", name)
            servers.enter_context(serve(pod.netns, pod.ip, HTTP_PORT, http=True, pod_name=name))
        yield
