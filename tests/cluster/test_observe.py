"""`steer observe` on the real node, read in the agent container as the docs say: flows
from off the node (the host, through the veth that carries the node's address) to a
NodePort. kube-proxy translates them, and steer's rules in the node's namespace decide
them on the backend. One the backend's policy refuses is copied to NFLOG; one it lets
through is told at its close (the client's FIN, copied to NFLOG, then the flow's conntrack
entry). Each event names the pod, the policy and the rule."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
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


def open_http_policy(namespace: str) -> str:
    """web's port 8080 open to anyone at L4 (no HTTP rule: no Envoy)."""
    policy = json.loads(web_policy(namespace))
    policy["spec"]["ingress"]["rules"] = [{"name": "open-http", "ports": [{"port": 8080}]}]
    return json.dumps(policy)


def host_get(
    node_ip: str, node_port: int, before_the_request: Callable[[str], object] = lambda _: None
) -> str | None:
    """One HTTP/1.0 GET from the host to the NodePort, closed by both sides; the client's
    address, or None if it got no answer. `before_the_request` is called with the address
    once connected."""
    with socket.socket() as client:
        client.bind((HOST_IP, 0))
        client.settimeout(5)
        client.connect((node_ip, node_port))
        source = f"{HOST_IP}:{client.getsockname()[1]}"
        before_the_request(source)
        client.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return source if answer.startswith(b"HTTP/1.") else None


def test_a_flow_let_in_from_off_the_node_is_an_event_while_open_and_at_its_close(
    cluster: Cluster,
) -> None:
    """Told once while open (it lived over 5 s), then within seconds of its close, while
    conntrack still holds the entry (two minutes of TIME_WAIT on this node): from the
    client's FIN, not from conntrack's letting go."""
    namespace, web = web_and_client(cluster, "ebpf")
    _, node_ip, node_port = serve_web(cluster, namespace, open_http_policy(namespace))
    eventually(lambda: host_get(node_ip, node_port), "the host to reach web's NodePort")

    def event(source: str, end: str | None) -> dict[str, Any] | None:
        return next((e for e in observed(cluster) if (e["src"], e["end"]) == (source, end)), None)

    def told_while_open(source: str) -> None:
        opened = eventually(lambda: event(source, None), f"{source}'s event while open", timeout=30)
        assert (opened["pod"], opened["verdict"], opened["bytes_sent"]) == ("web", "allowed", None)
        assert opened["duration_ms"] >= 5000

    source = host_get(node_ip, node_port, told_while_open)
    assert source is not None
    found = eventually(lambda: event(source, "fin"), f"{source}'s event at its close", timeout=30)
    assert (found["namespace"], found["pod"], found["direction"]) == (namespace, "web", "ingress")
    assert (found["verdict"], found["end"], found["via_envoy"]) == ("allowed", "fin", False)
    assert (found["policy"], found["rule"]) == (f"{namespace}/web", "open-http")
    assert (found["dst"], found["backend"]) == (f"{node_ip}:{node_port}", f"{web}:8080")
    assert found["bytes_sent"] > 0 and found["bytes_received"] > 0
    assert 0 <= found["duration_ms"] < 30_000
