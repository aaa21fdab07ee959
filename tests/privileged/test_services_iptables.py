"""Services on the iptables datapath, on the real kernel, with kube-proxy's rules in place
(the lab's stand-in for kube-proxy v1.20's iptables mode, steer.lab.kubeproxy): a flow
to a ClusterIP or a NodePort gets exactly the verdict of a flow to the backend kube-proxy
chose; where that backend has HTTP rules, Envoy gets the flow with the backend as its
original destination (chosen by the getsockopt hook), never the ClusterIP."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from steer.constants import ENVOY_OUTBOUND_PORT, LAB_GATEWAY_IP, NODE_NETNS
from steer.lab.podproc import PodProcess
from steer.lab.services import LabService
from steer.lab.spec import LabPod, LabState, default_lab_specs
from steer.lab.updown import lab_down, lab_frontends, lab_up
from steer.model.load import parse_policies
from steer.model.policy import HTTPPolicy
from steer.model.service import Endpoint, ServicePort, ServiceType
from steer.node.datapath import NodeDatapath
from steer.node.netns import run_in_netns
from tests.privileged.conftest import lab_pods
from tests.privileged.test_ebpf_datapath import unload_everything
from tests.samples import sample_policies

pytestmark = pytest.mark.privileged

WEB_VIP, API_VIP, SPREAD_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12"


def lab_services(spread: tuple[str, ...] = ("web", "api")) -> list[LabService]:
    return [
        LabService(
            "web",
            "default",
            (
                ServicePort(80, "http", name="http", node_port=30080),
                ServicePort(9090, 9090, name="debug"),
            ),
            type=ServiceType.NODE_PORT,
            cluster_ip=WEB_VIP,
            selector={"app": "web"},
        ),
        LabService(
            "api",
            "default",
            (ServicePort(7000, 7000),),
            cluster_ip=API_VIP,
            selector={"app": "api"},
        ),
        LabService(
            "spread",
            "default",
            (ServicePort(80, 7100),),
            cluster_ip=SPREAD_VIP,
            endpoints=tuple(Endpoint(IPv4Address(ip), {"": 7100}) for ip in spread),
        ),
    ]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    state_file = tmp_path_factory.mktemp("lab") / "lab.json"
    specs = default_lab_specs()
    try:
        state = lab_up(specs, state_file, services=[])
        ips = {p.name: p.ip for p in state.pods}
        services = lab_services(spread=(ips["web"], ips["api"]))
        yield lab_up(specs, state_file, services=services)
    finally:
        lab_down(state_file=state_file)


@pytest.fixture
def node(lab: LabState, tmp_path: Path) -> Iterator[NodeDatapath]:
    unload_everything()
    datapath = NodeDatapath()
    try:
        yield datapath
    finally:
        datapath.close()
        unload_everything()


def pod(lab: LabState, name: str) -> LabPod:
    return lab.pod("default", name)


def sync(node: NodeDatapath, lab: LabState, policies: list[HTTPPolicy] | None = None) -> None:
    iptables = {"steer.dev/dataplane": "iptables"}
    pods = lab_pods(lab, dict.fromkeys(("client", "web", "api"), iptables))
    report = run_in_netns(
        NODE_NETNS,
        lambda: node.sync(
            sample_policies() if policies is None else policies,
            pods,
            lab.node_cgroup,
            services=lab_frontends(lab),
        ),
    )
    assert report.errors == []
    assert {d for d, _ in report.dataplanes.values()} == {"iptables"}


@pytest.fixture
def client(lab: LabState) -> Iterator[PodProcess]:
    with PodProcess.start(pod(lab, "client").netns, pod(lab, "client").cgroup) as worker:
        yield worker


def test_clusterip_gets_exactly_the_backends_l4_verdict_after_kube_proxy(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab)
    web, api = pod(lab, "web"), pod(lab, "api")
    with PodProcess.start(api.netns, api.cgroup) as server:
        server.serve_http(api.ip, 7000, "api")
        reply = client.request(API_VIP, 7000, "GET", "/x")
    assert (reply.status, b'"pod": "api"' in reply.body) == (200, True)
    # web's debug port is denied at L4: through kube-proxy exactly as directly.
    with PodProcess.start(web.netns, web.cgroup) as server:
        server.serve_echo(web.ip, 9090)
        through_service = client.connect_outcome(WEB_VIP, 9090, timeout=1.0)[0]
        direct = client.connect_outcome(web.ip, 9090, timeout=1.0)[0]
    assert through_service == direct == "refused"


def test_a_clusterip_whose_backend_has_http_rules_reaches_envoy_with_the_backend(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab)
    with PodProcess.start(NODE_NETNS, lab.node_cgroup) as envoy:
        listener = envoy.listen("0.0.0.0", ENVOY_OUTBOUND_PORT)
        for address, port in ((WEB_VIP, 80), (LAB_GATEWAY_IP, 30080)):
            seen: list[tuple[str, int]] = []
            accept = threading.Thread(
                target=lambda seen=seen: seen.append(envoy.accept_original_dst(listener))
            )
            accept.start()
            conn = client.open_tcp(address, port)
            accept.join(timeout=5)
            # kube-proxy never translated it: the application's peer is what it dialled.
            assert client.peername(conn) == (address, port)
            client.tcp_close(conn)
            assert seen == [(pod(lab, "web").ip, 8080)], (address, port)


def _spread(client: PodProcess, rounds: int) -> Counter[str]:
    served: Counter[str] = Counter()
    for _ in range(rounds):
        body = client.request(SPREAD_VIP, 80, "GET", "/").body
        served[body.split(b'"pod": "')[1].split(b'"')[0].decode()] += 1
    return served


WEB_TAKES_7100 = parse_policies(
    """
apiVersion: steer.dev/v1alpha1
kind: HTTPPolicy
metadata: {name: web-7100, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    defaultAction: Deny
    rules:
      - name: client-7100
        from: [{podSelector: {matchLabels: {app: client}}}]
        ports: [{port: 7100}]
""",
    "web-7100.yaml",
)[0]


def test_kube_proxy_spreads_and_each_flow_is_decided_on_its_backend(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab, policies=[])
    web, api = pod(lab, "web"), pod(lab, "api")
    with (
        PodProcess.start(web.netns, web.cgroup) as web_server,
        PodProcess.start(api.netns, api.cgroup) as api_server,
    ):
        web_server.serve_http(web.ip, 7100, "web")
        api_server.serve_http(api.ip, 7100, "api")
        assert set(_spread(client, 40)) == {"web", "api"}
        # web takes the client on 7100, api does not: kube-proxy still sends about half
        # the flows to each, and each gets its backend's verdict.
        api_policy = [p for p in sample_policies() if p.metadata.name == "api"]
        sync(node, lab, policies=[*api_policy, *WEB_TAKES_7100])
        outcomes = Counter(
            client.connect_outcome(SPREAD_VIP, 80, timeout=1.0)[0] for _ in range(40)
        )
        direct = {
            name: client.connect_outcome(ip, 7100, timeout=1.0)[0]
            for name, ip in (("web", web.ip), ("api", api.ip))
        }
    assert direct == {"web": "connected", "api": "refused"}
    assert set(outcomes) == {"connected", "refused"}, outcomes


API_ON_7001 = next(
    iter(
        parse_policies(
            (Path(__file__).parents[2] / "steer/samples/api.yaml")
            .read_text()
            .replace("port: 7000", "port: 7001"),
            "api.yaml",
        )[0]
    )
)


def test_a_policy_change_revokes_a_live_flow_through_kube_proxy(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab)
    api = pod(lab, "api")
    with PodProcess.start(api.netns, api.cgroup) as server:
        server.serve_echo(api.ip, 7000)
        kept = client.open_tcp(API_VIP, 7000)
        assert client.tcp_echo(kept, b"one") == b"one"
        # A change elsewhere leaves the flow alone.
        sync(
            node,
            lab,
            policies=[p for p in sample_policies() if p.metadata.name != "client-egress"],
        )
        assert client.tcp_echo(kept, b"two") == b"two"
        # api now takes the client on 7001 only: the flow to api:7000 through the
        # ClusterIP is revoked, as a direct one would be.
        others = [p for p in sample_policies() if p.metadata.name != "api"]
        sync(node, lab, policies=[*others, API_ON_7001])
        assert client.tcp_echo(kept, b"three") is None
        client.tcp_close(kept)
