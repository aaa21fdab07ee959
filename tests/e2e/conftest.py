"""End-to-end fixtures: one local node (lab, control plane, agent, real Envoy) per module.

Network namespace names are global, so only one local node can run at a time: the node is
module-scoped, and a module that runs its own node (the demo) must not ask for this one.
Teardown happens even when a test fails: `LocalNode.start` removes the lab on any exit,
and the servers stop before the node goes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from steer.constants import (
    AGENT_STATUS_FILE,
    ANNOTATION_DATAPLANE,
    LOG_DIR,
    NODE_NETNS,
    POLICY_DIR,
)
from steer.demo import leftovers
from steer.lab.localnode import LocalNode, read_status, wait_for
from steer.lab.podproc import PodProcess
from steer.lab.process import supervised
from steer.lab.spec import default_lab_specs

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


class PodsNode(LocalNode):
    """A running local node plus a worker process inside each pod (its netns and its
    cgroup), so traffic is steered exactly as a pod's own would be on either datapath."""

    workers: dict[str, PodProcess]
    dataplane: str


@contextmanager
def pods_node(dataplane: str) -> Iterator[PodsNode]:
    """The default lab (client, web, api in `default`, labelled app=<name>), every pod on
    `dataplane`, fully synced, with a worker in each pod."""
    require_local_node()
    specs = [
        replace(spec, annotations={ANNOTATION_DATAPLANE: dataplane}) for spec in default_lab_specs()
    ]
    with LocalNode.start(specs=specs) as running, ExitStack() as workers:
        running.__class__ = PodsNode
        assert isinstance(running, PodsNode)
        running.dataplane = dataplane
        running.workers = {
            name: workers.enter_context(
                PodProcess.start(running.netns(name), running.lab.pod("default", name).cgroup)
            )
            for name in ("client", *HTTP_PODS)
        }
        assert running.dataplane_of("client") == dataplane
        yield running
    assert not leftovers(), f"the local node left state behind: {leftovers()}"


def agent_pid() -> int:
    found = subprocess.run(
        ["pgrep", "-f", "steer.cli agent"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(found) == 1, f"expected one agent, found {found}"
    return int(found[0])


def kill_agent() -> None:
    """kill -9 of the node's agent: no `finally` of its runs."""
    os.kill(agent_pid(), signal.SIGKILL)


@contextmanager
def restarted_agent() -> Iterator[Path]:
    """A new agent on the node whose agent the test killed, as the node started it, once it
    has synced; its log. It stops with the block, and the node then has no agent: a test
    that uses it comes last in its module."""
    synced_before = (read_status(AGENT_STATUS_FILE) or {}).get("loaded_at", 0)
    log = LOG_DIR / "agent-restarted.log"
    log.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "steer.cli", "agent", "--policies", str(POLICY_DIR)]
    with supervised(argv, log, netns=NODE_NETNS):
        wait_for(
            lambda: (read_status(AGENT_STATUS_FILE) or {}).get("loaded_at", 0) > synced_before,
            20,
            "the restarted agent to sync",
        )
        yield log


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def node(request: pytest.FixtureRequest) -> Iterator[PodsNode]:
    with pods_node(str(request.param)) as running:
        yield running


@pytest.fixture(scope="module")
def http_servers(node: PodsNode) -> None:
    """An HTTP server on web:8080 and api:8080 that answers with who it is and who called."""
    for name in HTTP_PODS:
        node.workers[name].serve_http(node.ip(name), HTTP_PORT, name)
