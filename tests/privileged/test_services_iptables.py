"""Services on the iptables datapath, on the real kernel, with kube-proxy's rules in place
(the lab's stand-in for kube-proxy v1.20's iptables mode, steer.lab.kubeproxy): a flow
to a ClusterIP or a NodePort gets exactly the verdict of a flow to the backend kube-proxy
chose; where that backend has HTTP rules, Envoy gets the flow with the backend as its
original destination (chosen by the getsockopt hook), never the ClusterIP."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from steer.constants import LAB_GATEWAY_IP, NODE_NETNS
from steer.lab.podproc import PodProcess
from steer.lab.services import LabService
from steer.lab.spec import LabPod, LabState, default_lab_specs
from steer.lab.updown import lab_down, lab_frontends, lab_up
from steer.model.load import parse_policies
from steer.model.policy import HTTPPolicy
from steer.model.service import Endpoint, ServicePort, ServiceType
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.netns import run_in_netns
from tests.privileged.conftest import lab_pods, served_by, through_envoy
from tests.samples import sample_policies

pytestmark = pytest.mark.privileged

WEB_VIP, API_VIP, SPREAD_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12"
UNKNOWN_VIP = "10.96.0.13"


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
            (ServicePort(7000, 7000, node_port=30700),),
            type=ServiceType.NODE_PORT,
            cluster_ip=API_VIP,
            selector={"app": "api"},
        ),
        # Known to kube-proxy but not (yet) to steer: the test leaves it out of the agent's
        # view, as a Service created a moment ago would be.
        LabService(
            "unknown",
            "default",
            (ServicePort(9090, 9090),),
            cluster_ip=UNKNOWN_VIP,
            selector={"app": "web"},
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


def pod(lab: LabState, name: str) -> LabPod:
    return lab.pod("default", name)


def sync(
    node: NodeDatapath,
    lab: LabState,
    policies: list[HTTPPolicy] | None = None,
    client_annotations: dict[str, str] | None = None,
) -> SyncReport:
    """As the agent syncs: every pod on iptables, the lab's Services but `unknown`."""
    iptables = {"steer.dev/dataplane": "iptables"}
    annotations = dict.fromkeys(("client", "web", "api"), iptables)
    annotations["client"] = {**iptables, **(client_annotations or {})}
    pods = lab_pods(lab, annotations, {"steer.dev/allow-exclusions": "true"})
    known = [f for f in lab_frontends(lab) if f.service != "default/unknown"]
    report = run_in_netns(
        NODE_NETNS,
        lambda: node.sync(
            sample_policies() if policies is None else policies,
            pods,
            lab.node_cgroup,
            services=known,
            pod_cidrs=[IPv4Network(lab.pod_cidr)],
        ),
    )
    assert report.errors == []
    assert {d for d, _ in report.dataplanes.values()} == {"iptables"}
    return report


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
    listener = sync(node, lab).service_listeners["default/web:http"]
    for address, port in ((WEB_VIP, 80), (LAB_GATEWAY_IP, 30080)):
        # kube-proxy never translated it: the application's peer is what it dialled, and
        # Envoy got it on the listener of web's Service port.
        seen, peer = through_envoy(lab, client, address, port, listener)
        assert (seen, peer) == ([(pod(lab, "web").ip, 8080)], (address, port))


def _spread(client: PodProcess, rounds: int) -> Counter[str]:
    return served_by(client, SPREAD_VIP, 80, rounds)


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


def test_a_service_steer_does_not_know_yet_is_decided_on_its_backend(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    """kube-proxy already DNATs a Service the agent has not seen: its flow is decided on
    the backend kube-proxy chose (web's debug port: denied), not on the ClusterIP."""
    sync(node, lab)
    web = pod(lab, "web")
    with PodProcess.start(web.netns, web.cgroup) as server:
        server.serve_echo(web.ip, 9090)
        outcome = client.connect_outcome(UNKNOWN_VIP, 9090, timeout=1.0)[0]
    assert outcome == "refused"


def test_a_node_port_on_a_node_address_inside_the_pod_range_still_reaches_kube_proxy(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    """The node's address is in the pod range here; flows to it keep kube-proxy's NAT."""
    sync(node, lab)
    api = pod(lab, "api")
    with PodProcess.start(api.netns, api.cgroup) as server:
        server.serve_http(api.ip, 7000, "api")
        reply = client.request(LAB_GATEWAY_IP, 30700, "GET", "/x")
    assert (reply.status, b'"pod": "api"' in reply.body) == (200, True)


WEB_DENIES_CLIENT = parse_policies(
    """
apiVersion: steer.dev/v1alpha1
kind: HTTPPolicy
metadata: {name: web-denies-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    defaultAction: Allow
    rules:
      - {name: no-client, action: Deny, from: [{podSelector: {matchLabels: {app: client}}}],
         ports: [{port: 8080}]}
      - {name: api-reads, from: [{podSelector: {matchLabels: {app: api}}}],
         ports: [{port: 8080}], http: {methods: [GET]}}
""",
    "web-denies-client.yaml",
)[0]


def test_an_outbound_exclusion_does_not_take_a_service_flow_past_the_backends_deny(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    """web's backends have HTTP rules, so steered pods' flows to it are marked for Envoy
    before kube-proxy; the client's exclusion of port 80 skips that REDIRECT. The flow
    must still meet web's L4 deny of the client, decided after kube-proxy's DNAT."""
    sync(
        node,
        lab,
        policies=list(WEB_DENIES_CLIENT),
        client_annotations={"steer.dev/exclude-outbound-ports": "80"},
    )
    web = pod(lab, "web")
    with PodProcess.start(web.netns, web.cgroup) as server:
        server.serve_http(web.ip, 8080, "web")
        assert client.connect_outcome(web.ip, 8080, timeout=1.0)[0] == "refused"
        assert client.connect_outcome(WEB_VIP, 80, timeout=1.0)[0] == "refused"
