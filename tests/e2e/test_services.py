"""Services on the local node with a real Envoy, on both datapaths: a request to a
ClusterIP (or the node's NodePort) gets exactly the answer a request to the backend gets,
200, 403 or a refused connect, and the application sees the address it dialled.

The embedded default's Services (steer.lab.services.default_lab_services): web's port 80
leads to web's container port named http (8080), api's port 7000 to api:7000. The lab's
stand-in for kube-proxy (steer.lab.kubeproxy) holds kube-proxy's rules for them, as a
cluster node would."""

from __future__ import annotations

import time

import pytest

from steer.constants import AGENT_STATUS_FILE, LAB_GATEWAY_IP, LOG_DIR
from steer.lab.localnode import read_status
from steer.model.servicepolicy import service_listener_ports
from tests.e2e.conftest import HTTP_PORT, PodsNode
from tests.e2e.test_http_policy import (
    ALLOWED,
    DENIED,
    PUBLIC_ONLY,
    Outcome,
    Response,
    apply,
    expect,
    http_rule,
    ingress,
    prefix,
    request,
)

NODE_PORT = 30080
pytestmark = [
    pytest.mark.privileged,
    pytest.mark.envoy,
    pytest.mark.usefixtures("http_servers"),
]


def cluster_ip(node: PodsNode, name: str) -> str:
    service = next(s for s in node.lab.services if s.name == name)
    assert service.cluster_ip
    return service.cluster_ip


def via_service(node: PodsNode, path: str, *, address: str = "", port: int = 80) -> Response:
    reply = node.workers["client"].request(
        address or cluster_ip(node, "web"), port, "GET", path, []
    )
    return Response(reply.status, reply.body, reply.headers)


@pytest.mark.parametrize(
    ("path", "outcome"), [("/public/page", ALLOWED), ("/admin", DENIED), ("/public/secret", DENIED)]
)
def test_a_clusterip_gets_the_backends_http_verdict(
    node: PodsNode, path: str, outcome: Outcome
) -> None:
    apply(node, PUBLIC_ONLY)
    expect(request(node, path), outcome)
    expect(via_service(node, path), outcome)


@pytest.mark.parametrize(("path", "outcome"), [("/public/page", ALLOWED), ("/admin", DENIED)])
def test_the_node_port_gets_the_same_http_verdict(
    node: PodsNode, path: str, outcome: Outcome
) -> None:
    apply(node, PUBLIC_ONLY)
    expect(via_service(node, path, address=LAB_GATEWAY_IP, port=NODE_PORT), outcome)


def test_a_port_denied_at_l4_is_refused_through_the_clusterip_as_directly(
    node: PodsNode,
) -> None:
    # web takes nobody: the connect itself is refused, no Envoy involved.
    apply(node, ingress("web"))
    client = node.workers["client"]
    direct = client.connect_outcome(node.ip("web"), HTTP_PORT, timeout=1.0)[0]
    through = client.connect_outcome(cluster_ip(node, "web"), 80, timeout=1.0)[0]
    assert (direct, through) == ("refused", "refused")


def test_the_application_sees_the_clusterip_it_dialled(node: PodsNode) -> None:
    apply(node, PUBLIC_ONLY)
    client = node.workers["client"]
    vip = cluster_ip(node, "web")
    conn = client.open_tcp(vip, 80)
    try:
        assert client.peername(conn) == (vip, 80)
    finally:
        client.tcp_close(conn)


def test_status_lists_the_services_with_their_backends(node: PodsNode) -> None:
    apply(node, PUBLIC_ONLY)
    status = read_status(AGENT_STATUS_FILE) or {}
    services = {s["name"]: s for s in status["services"]}
    web = services["web"]
    assert web["cluster_ip"] == cluster_ip(node, "web")
    backends = [f"{node.ip('web')}:{HTTP_PORT}"]
    # web:8080 has HTTP rules, so its Service port has a listener of its own.
    listener = service_listener_ports([("default/web", "http")])["default/web", "http"]
    assert web["frontends"] == [
        {
            "address": address,
            "port_name": "http",
            "node_port": node_port,
            "backends": backends,
            "balanced_by": "connect4",
            "envoy_listener": listener,
        }
        for address, node_port in (
            (f"{cluster_ip(node, 'web')}:80", False),
            (f"{LAB_GATEWAY_IP}:{NODE_PORT}", True),
        )
    ]
    assert web["problems"] == []


# --- the Service dialled, as Envoy sees it -------------------------------------------------

VIA_WEB_SERVICE = ingress("web", http_rule(services=["web"]))


def test_a_rule_on_the_service_matches_only_requests_dialled_to_it(node: PodsNode) -> None:
    """web takes requests that came through its Service, by its ClusterIP or its NodePort,
    and no other: the same backend dialled by its own address is refused."""
    apply(node, VIA_WEB_SERVICE)
    expect(via_service(node, "/anything"), ALLOWED)
    expect(via_service(node, "/anything", address=LAB_GATEWAY_IP, port=NODE_PORT), ALLOWED)
    expect(request(node, "/anything"), DENIED)


def test_a_deny_on_the_service_names_it_with_its_namespace(node: PodsNode) -> None:
    apply(
        node,
        ingress(
            "web",
            http_rule("Deny", services=["default/web"], paths=[prefix("/admin")]),
            default="Allow",
        ),
    )
    expect(via_service(node, "/admin"), DENIED)
    expect(via_service(node, "/public/page"), ALLOWED)
    expect(request(node, "/admin"), ALLOWED)


def test_envoys_access_log_names_the_service_and_the_backend(node: PodsNode) -> None:
    apply(node, VIA_WEB_SERVICE)
    marker = f"/logged/{node.dataplane}"
    expect(via_service(node, marker), ALLOWED)
    wanted = f"steer-service service=default/web port=http backend={node.ip('web')}:{HTTP_PORT} "
    deadline = time.monotonic() + 10  # Envoy flushes its access log every second
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [
            line
            for line in (LOG_DIR / "envoy.log").read_text(errors="replace").splitlines()
            if marker in line
        ]
        if lines:
            break
        time.sleep(0.2)
    assert lines, "no access log line for the request"
    assert lines[-1].startswith(wanted) and f'"GET {marker}" 200 ' in lines[-1], lines[-1]
