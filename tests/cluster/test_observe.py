"""`steer observe` on the real node, read in the agent container as the docs say: a flow
from off the node (the host, through the veth that carries the node's address) to a
NodePort whose backend's policy refuses it. kube-proxy translates it, steer's rules in
the node's namespace refuse it and copy the packet to NFLOG, and the agent's event names
the pod, the policy and the rule."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from tests.cluster.kube import NODE_IP, SYSTEM, Cluster, eventually
from tests.cluster.test_policy import web_and_client, web_policy
from tests.cluster.test_services import serve_web

pytestmark = pytest.mark.privileged

# The host's end of the node's veth (scripts/kube-node.sh): off the node.
HOST_IP = "10.87.0.1"


def observed(cluster: Cluster) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "-n", SYSTEM, "exec", cluster.node_pod(), "-c", "agent", "--",
        "steer", "observe", "--json", "--last", "1000", "--layer", "l4",
    ).stdout  # fmt: skip
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_refused_flow_from_off_the_node_is_an_event_in_the_agent(cluster: Cluster) -> None:
    namespace, web = web_and_client(cluster, "ebpf")
    _, node_ip, _ = serve_web(cluster, namespace, web_policy(namespace))
    assert node_ip == NODE_IP
    service = cluster.get("-n", namespace, "service", "web")
    debug = next(p["nodePort"] for p in service["spec"]["ports"] if p["name"] == "debug")
    eventually(
        lambda: cluster.http(namespace, "client", f"http://{web}:9090/").refused or None,
        "the policy to refuse port 9090",
    )
    with socket.socket() as client:
        # Bound first: a connect that fails gives its port back.
        client.bind((HOST_IP, 0))
        source = f"{HOST_IP}:{client.getsockname()[1]}"
        client.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            client.connect((node_ip, debug))

    def event() -> dict[str, Any] | None:
        return next((e for e in observed(cluster) if e["src"] == source), None)

    found = eventually(event, f"an event of the refused flow from {source}", timeout=30)
    assert (found["namespace"], found["pod"], found["direction"]) == (namespace, "web", "ingress")
    assert (found["verdict"], found["end"], found["dataplane"]) == ("denied", "refused", "iptables")
    assert (found["policy"], found["rule"]) == (f"{namespace}/web", "no-debug-port")
    # Decided after kube-proxy's translation: the backend pod's port.
    assert found["dst"] == f"{web}:9090"
