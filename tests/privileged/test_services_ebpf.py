"""Services on the eBPF datapath, on the real kernel: connect4 balances a ClusterIP (or a
NodePort on the node's address) to a backend and decides the flow for that backend;
getpeername hands the application back the address it dialled.

Each test installs its own Services through `NodeDatapath.sync`, as the agent does, and
dials them from a process in the client pod's cgroup."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

import pytest

from steer.constants import LAB_GATEWAY_IP, NODE_NETNS
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPod, LabState
from steer.model.policy import HTTPPolicy
from steer.model.service import Endpoint, Service, ServicePort, ServiceType, frontends
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.netns import run_in_netns
from tests.privileged.conftest import served_by, through_envoy
from tests.privileged.test_ebpf_datapath import counters, pods_of
from tests.samples import sample_policies

pytestmark = pytest.mark.privileged

WEB_VIP = "10.96.0.10"
API_VIP = "10.96.0.11"
SPREAD_VIP = "10.96.0.12"
EMPTY_VIP = "10.96.0.13"


def pod(lab: LabState, name: str) -> LabPod:
    return lab.pod("default", name)


def endpoint(lab: LabState, name: str, port: int, port_name: str = "") -> Endpoint:
    return Endpoint(IPv4Address(pod(lab, name).ip), {port_name: port}, pod=f"default/{name}")


def services_of(lab: LabState, spread: Sequence[str] = ("web", "api")) -> list[Service]:
    return [
        # web's HTTP port by name, plus its debug port, which web's policy denies.
        Service(
            "default",
            "web",
            IPv4Address(WEB_VIP),
            (
                ServicePort(80, "http", name="http", node_port=30080),
                ServicePort(9090, 9090, name="debug"),
            ),
            (
                Endpoint(
                    IPv4Address(pod(lab, "web").ip),
                    {"http": 8080, "debug": 9090},
                    pod="default/web",
                ),
            ),
            type=ServiceType.NODE_PORT,
        ),
        Service(
            "default",
            "api",
            IPv4Address(API_VIP),
            (ServicePort(7000, 7000),),
            (endpoint(lab, "api", 7000),),
        ),
        Service(
            "default",
            "spread",
            IPv4Address(SPREAD_VIP),
            (ServicePort(80, 7100),),
            tuple(endpoint(lab, name, 7100) for name in spread),
        ),
        Service("default", "empty", IPv4Address(EMPTY_VIP), (ServicePort(80, 80),), ()),
    ]


def node_map_count(node: NodeDatapath, name: str) -> int:
    assert node.ebpf is not None
    entries, _ = node.ebpf.bpf.map_fill()[name]
    return entries


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sync(
    node: NodeDatapath,
    lab: LabState,
    services: list[Service],
    policies: list[HTTPPolicy] | None = None,
) -> SyncReport:
    found, _ = frontends(services, node_ips=[IPv4Address(LAB_GATEWAY_IP)])
    report = run_in_netns(
        NODE_NETNS,
        lambda: node.sync(
            sample_policies() if policies is None else policies,
            pods_of(lab),
            lab.node_cgroup,
            services=found,
        ),
    )
    assert report.errors == []
    assert report.service_fallbacks == []
    return report


def test_clusterip_gets_exactly_the_backends_verdicts(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    report = sync(node, lab, services_of(lab))
    web, api = pod(lab, "web"), pod(lab, "api")
    # L7 at the backend (web:8080 has HTTP rules): Envoy gets the backend as the
    # original destination, on the listener of web's Service port (which tells Envoy the
    # Service), and the application still sees the ClusterIP.
    listener = report.service_listeners["default/web:http"]
    assert through_envoy(lab, client, WEB_VIP, 80, listener) == ([(web.ip, 8080)], (WEB_VIP, 80))
    # Denied at the backend (web's debug port): refused, as web:9090 is.
    assert client.connect_outcome(WEB_VIP, 9090)[0] == "refused"
    assert client.connect_outcome(web.ip, 9090)[0] == "refused"
    # Allowed at L4 (api:7000): straight to the backend, no Envoy.
    dialled = node_map_count(node, "steer_dialled")
    with PodProcess.start(api.netns, api.cgroup) as server:
        server.serve_http(api.ip, 7000, "api")
        reply = client.request(API_VIP, 7000, "GET", "/x")
        conn = client.open_tcp(API_VIP, 7000)
        assert client.peername(conn) == (API_VIP, 7000)
        assert node_map_count(node, "steer_dialled") >= 1
        client.tcp_close(conn)
    # A closed socket's dialled address goes with it (the map fill gauges read this).
    assert wait_until(lambda: node_map_count(node, "steer_dialled") <= dialled)
    assert reply.status == 200
    assert b'"pod": "api"' in reply.body
    count = counters("client")
    assert (count["svc_balanced"], count["redirects"], count["direct"]) == (3, 1, 2)


def test_node_port_on_the_nodes_address_gets_the_same_verdict(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    report = sync(node, lab, services_of(lab))
    listener = report.service_listeners["default/web:http"]
    seen, peer = through_envoy(lab, client, LAB_GATEWAY_IP, 30080, listener)
    assert (seen, peer) == ([(pod(lab, "web").ip, 8080)], (LAB_GATEWAY_IP, 30080))


def _spread(client: PodProcess, rounds: int) -> Counter[str]:
    return served_by(client, SPREAD_VIP, 80, rounds)


def test_backends_spread_and_a_removed_one_gets_no_new_connects(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    # No policy: every flow is allowed and direct, so only balancing is at work.
    sync(node, lab, services_of(lab), policies=[])
    web, api = pod(lab, "web"), pod(lab, "api")
    with (
        PodProcess.start(web.netns, web.cgroup) as web_server,
        PodProcess.start(api.netns, api.cgroup) as api_server,
    ):
        web_server.serve_http(web.ip, 7100, "web")
        api_server.serve_http(api.ip, 7100, "api")
        # 40 uniform picks from 2 miss one backend with probability 2 * 2^-40.
        assert set(_spread(client, 40)) == {"web", "api"}
        sync(node, lab, services_of(lab, spread=("web",)), policies=[])
        assert _spread(client, 30) == Counter({"web": 30})
        sync(node, lab, services_of(lab, spread=("api", "web")), policies=[])
        assert set(_spread(client, 40)) == {"web", "api"}


def test_a_service_without_backends_refuses_connects(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab, services_of(lab))
    outcome, seconds = client.connect_outcome(EMPTY_VIP, 80)
    assert (outcome, seconds < 0.1) == ("refused", True)
    assert counters("client")["svc_empty"] == 1


def test_a_v4_mapped_connect_to_a_clusterip_is_balanced_and_sees_the_clusterip(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab, services_of(lab))
    api = pod(lab, "api")
    with PodProcess.start(api.netns, api.cgroup) as server:
        server.serve_echo(api.ip, 7000)
        conn = client.open_tcp6(f"::ffff:{API_VIP}", 7000)
        assert client.peername(conn) == (f"::ffff:{API_VIP}", 7000)
        assert client.tcp_echo(conn, b"ping") == b"ping"
        client.tcp_close(conn)
    assert client.connect_outcome(f"::ffff:{WEB_VIP}", 9090)[0] != "connected"


def test_services_are_map_updates_and_survive_an_agent_restart(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab, services_of(lab))
    node.close()
    # A new agent adopts the pins and reads the Services back: a change then rewrites
    # only what differs, and what it drops is gone.
    again = NodeDatapath()
    try:
        sync(again, lab, [s for s in services_of(lab) if s.name != "api"])
        assert again.ebpf is not None and again.ebpf.bpf.adopted
        assert client.connect_outcome(API_VIP, 7000, timeout=1.0)[0] != "connected"
        assert client.connect_outcome(EMPTY_VIP, 80)[0] == "refused"
    finally:
        again.close()
