"""steer installed from its manifests on a real node; the pod webhook, called by the API
server through the Service, and the readiness gate the agent opens only once the node's
Envoy serves the pod's routes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network

import pytest

from steer.render.xds import route_name
from tests.cluster.kube import (
    GATE,
    SYSTEM,
    Cluster,
    condition,
    eventually,
    node_envoy_pids,
    pod_entry,
)

pytestmark = pytest.mark.privileged


def test_control_plane_and_node_pods_come_up_through_the_controllers(cluster: Cluster) -> None:
    control = cluster.get("-n", SYSTEM, "deployment", "steer-control")
    assert control["status"].get("readyReplicas") == 2
    node = cluster.get("-n", SYSTEM, "daemonset", "steer-node")
    assert node["status"].get("numberReady") == 1
    pods = cluster.get("-n", SYSTEM, "pods")["items"]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {"steer-kube.local/steer:dev"}


def test_opted_in_pod_is_mutated_and_gated_until_envoy_has_its_routes(cluster: Cluster) -> None:
    steered = cluster.namespace()
    plain = cluster.namespace(inject=False)
    cluster.web_pod(steered)
    cluster.web_pod(plain)
    pod = cluster.get("-n", steered, "pod", "web")
    assert {"conditionType": GATE} in pod["spec"].get("readinessGates", [])
    assert "readinessGates" not in cluster.get("-n", plain, "pod", "web")["spec"]

    cluster.wait_ready(steered, "web")
    pod = cluster.get("-n", steered, "pod", "web")
    gate = condition(pod, GATE)
    assert gate is not None and gate["status"] == "True", gate
    assert "Envoy has the pod's routes" in gate["message"]
    ip = pod["status"]["podIP"]
    assert route_name(IPv4Network(f"{ip}/32")) in cluster.envoy_routes()


@contextmanager
def envoy_stopped() -> Iterator[None]:
    """The node's Envoy frozen (SIGSTOP): its admin socket accepts but never answers, so
    nobody can learn what it serves."""
    pids = node_envoy_pids()
    assert pids, "the node's Envoy is not running"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_gate_stays_closed_while_envoy_cannot_confirm_the_routes(cluster: Cluster) -> None:
    namespace = cluster.namespace()
    with envoy_stopped():
        cluster.web_pod(namespace)

        def waiting() -> str | None:
            entry = pod_entry(cluster.agent_status(), namespace, "web")
            state = str((entry or {}).get("readiness_gate", ""))
            return state if state.startswith("waiting") else None

        # Steered (the agent lists it with its datapath) but not gated open.
        state = eventually(waiting, "the agent to hold the pod's gate")
        assert "Envoy" in state, state
        gate = condition(cluster.get("-n", namespace, "pod", "web"), GATE)
        assert gate is None or gate["status"] != "True", gate
    cluster.wait_ready(namespace, "web")
