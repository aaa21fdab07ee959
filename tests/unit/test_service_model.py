"""The pure Service model: which frontends a node balances, over which backends, and every
problem that makes a Service behave other than its author likely meant; and the lab's
endpoints controller (`endpoints_from_pods`)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from steer.model.service import (
    MAX_BACKENDS,
    Backend,
    Endpoint,
    Frontend,
    PodPorts,
    Problem,
    Service,
    ServicePort,
    ServiceProblem,
    ServiceType,
    endpoints_from_pods,
    frontends,
)

POD_CIDR = IPv4Network("10.244.0.0/16")
NODE_IPS = (IPv4Address("192.168.1.10"), IPv4Address("192.168.1.11"))
VIP = IPv4Address("10.96.0.10")
HTTP = ServicePort(80, "http", name="http")


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def endpoint(
    address: str, ports: Mapping[str, int], *, ready: bool = True, pod: str = ""
) -> Endpoint:
    return Endpoint(ip(address), ports, ready, pod)


def service(
    *ports: ServicePort,
    endpoints: Sequence[Endpoint] = (),
    name: str = "web",
    namespace: str = "default",
    cluster_ip: IPv4Address | None = VIP,
    type: ServiceType = ServiceType.CLUSTER_IP,
    selector: Mapping[str, str] | None = None,
) -> Service:
    return Service(
        namespace=namespace,
        name=name,
        cluster_ip=cluster_ip,
        ports=ports or (HTTP,),
        endpoints=tuple(endpoints),
        selector=selector,
        type=type,
    )


def only(problems: list[ServiceProblem], kind: Problem) -> list[ServiceProblem]:
    return [p for p in problems if p.problem is kind]


# --- frontends: ClusterIP ------------------------------------------------------------------


def test_named_target_is_resolved_per_endpoint() -> None:
    web = service(
        endpoints=[
            endpoint("10.244.0.2", {"http": 8080}, pod="default/web-a"),
            endpoint("10.244.0.3", {"http": 9090}, pod="default/web-b"),
        ]
    )
    found, problems = frontends([web], [POD_CIDR], NODE_IPS)
    assert found == [
        Frontend(
            VIP,
            80,
            "default/web",
            "http",
            (
                Backend(ip("10.244.0.2"), 8080, "default/web-a"),
                Backend(ip("10.244.0.3"), 9090, "default/web-b"),
            ),
        )
    ]
    assert not found[0].node_port
    assert problems == []


def test_each_port_is_a_frontend_of_its_own_with_its_own_numbers() -> None:
    metrics = ServicePort(9100, "metrics", name="metrics")
    web = service(
        HTTP,
        metrics,
        endpoints=[endpoint("10.244.0.2", {"http": 8080, "metrics": 9200})],
    )
    found, problems = frontends([web], [POD_CIDR])
    assert [(f.ip, f.port, f.port_name, f.backends) for f in found] == [
        (VIP, 80, "http", (Backend(ip("10.244.0.2"), 8080),)),
        (VIP, 9100, "metrics", (Backend(ip("10.244.0.2"), 9200),)),
    ]
    assert problems == []


def test_a_single_unnamed_port_resolves_under_the_empty_name() -> None:
    db = service(ServicePort(5432, 5432), endpoints=[endpoint("10.244.0.9", {"": 5433})])
    found, problems = frontends([db], [POD_CIDR])
    assert [f.backends for f in found] == [(Backend(ip("10.244.0.9"), 5433),)]
    assert problems == []


# --- frontends: NodePort -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER])
def test_node_ports_are_frontends_on_every_node_address(kind: ServiceType) -> None:
    port = ServicePort(80, "http", name="http", node_port=30080)
    web = service(port, type=kind, endpoints=[endpoint("10.244.0.2", {"http": 8080})])
    found, problems = frontends([web], [POD_CIDR], NODE_IPS)
    backends = (Backend(ip("10.244.0.2"), 8080),)
    assert found == [
        Frontend(VIP, 80, "default/web", "http", backends),
        Frontend(NODE_IPS[0], 30080, "default/web", "http", backends, node_port=True),
        Frontend(NODE_IPS[1], 30080, "default/web", "http", backends, node_port=True),
    ]
    assert problems == []


def test_a_cluster_ip_service_has_no_node_port_frontends_even_with_a_node_port() -> None:
    port = ServicePort(80, "http", name="http", node_port=30080)
    web = service(port, endpoints=[endpoint("10.244.0.2", {"http": 8080})])
    found, _ = frontends([web], [POD_CIDR], NODE_IPS)
    assert [(f.ip, f.port, f.node_port) for f in found] == [(VIP, 80, False)]


def test_node_ports_without_node_addresses_give_the_cluster_ip_only() -> None:
    port = ServicePort(80, "http", name="http", node_port=30080)
    web = service(
        port, type=ServiceType.NODE_PORT, endpoints=[endpoint("10.244.0.2", {"http": 8080})]
    )
    found, _ = frontends([web], [POD_CIDR])
    assert [(f.ip, f.port) for f in found] == [(VIP, 80)]


# --- frontends: endpoints and problems -----------------------------------------------------


def test_not_ready_endpoints_are_not_backends() -> None:
    web = service(
        endpoints=[
            endpoint("10.244.0.2", {"http": 8080}),
            endpoint("10.244.0.3", {"http": 8080}, ready=False),
        ]
    )
    found, problems = frontends([web], [POD_CIDR])
    assert [f.backends for f in found] == [(Backend(ip("10.244.0.2"), 8080),)]
    assert problems == []


def test_no_ready_endpoint_keeps_the_frontend_and_names_the_fix() -> None:
    web = service(
        selector={"app": "web"},
        endpoints=[
            endpoint("10.244.0.2", {"http": 8080}, ready=False),
            endpoint("10.244.0.3", {"http": 8080}, ready=False),
        ],
    )
    found, problems = frontends([web], [POD_CIDR])
    # The frontend stays, with nothing behind it: connects are refused, not sent to
    # kube-proxy, exactly as kube-proxy itself would refuse them.
    assert [(f.ip, f.port, f.backends) for f in found] == [(VIP, 80, ())]
    [problem] = problems
    assert (problem.service, problem.problem) == ("default/web", Problem.NO_READY_ENDPOINTS)
    assert "port http" in problem.message
    assert "(2 not ready)" in problem.message
    assert "refused" in problem.message
    assert "Fix:" in problem.message
    assert "{'app': 'web'}" in problem.message


def test_no_endpoint_at_all_is_reported_without_a_not_ready_count() -> None:
    found, problems = frontends([service(selector={"app": "gone"})], [POD_CIDR])
    assert [f.backends for f in found] == [()]
    [problem] = problems
    assert problem.problem is Problem.NO_READY_ENDPOINTS
    assert "not ready" not in problem.message
    assert "Fix:" in problem.message


def test_no_ready_endpoint_is_reported_for_every_port() -> None:
    metrics = ServicePort(9100, 9100, name="metrics")
    found, problems = frontends([service(HTTP, metrics)], [POD_CIDR])
    assert [f.backends for f in found] == [(), ()]
    assert [p.problem for p in problems] == [Problem.NO_READY_ENDPOINTS] * 2
    assert "port http" in problems[0].message
    assert "port metrics" in problems[1].message


def test_a_port_name_no_endpoint_carries_is_reported_by_name() -> None:
    admin = ServicePort(8443, "admin", name="admin")
    web = service(
        HTTP,
        admin,
        endpoints=[endpoint("10.244.0.2", {"http": 8080}), endpoint("10.244.0.3", {"http": 8080})],
    )
    found, problems = frontends([web], [POD_CIDR])
    assert [(f.port, len(f.backends)) for f in found] == [(80, 2), (8443, 0)]
    [problem] = problems
    assert (problem.service, problem.problem) == ("default/web", Problem.PORT_ON_NO_ENDPOINT)
    assert "'admin'" in problem.message
    assert "port admin" in problem.message
    assert "Fix:" in problem.message


def test_a_port_some_endpoints_lack_uses_the_others_without_a_problem() -> None:
    web = service(
        endpoints=[endpoint("10.244.0.2", {"http": 8080}), endpoint("10.244.0.3", {"web": 8080})]
    )
    found, problems = frontends([web], [POD_CIDR])
    assert [f.backends for f in found] == [(Backend(ip("10.244.0.2"), 8080),)]
    assert problems == []


def test_an_endpoint_outside_the_pod_cidr_is_used_and_reported() -> None:
    web = service(
        endpoints=[endpoint("10.244.0.2", {"http": 8080}), endpoint("192.168.7.7", {"http": 80})]
    )
    found, problems = frontends([web], [POD_CIDR])
    assert [f.backends for f in found] == [
        (Backend(ip("10.244.0.2"), 8080), Backend(ip("192.168.7.7"), 80))
    ]
    [problem] = problems
    assert (problem.service, problem.problem) == (
        "default/web",
        Problem.ENDPOINT_OUTSIDE_POD_CIDR,
    )
    assert "192.168.7.7" in problem.message
    assert str(POD_CIDR) in problem.message


def test_without_pod_cidrs_no_endpoint_is_reported_as_outside() -> None:
    web = service(endpoints=[endpoint("192.168.7.7", {"http": 80})])
    found, problems = frontends([web])
    assert [f.backends for f in found] == [(Backend(ip("192.168.7.7"), 80),)]
    assert problems == []


def test_an_endpoint_in_any_of_several_pod_cidrs_is_inside() -> None:
    web = service(endpoints=[endpoint("10.245.0.2", {"http": 8080})])
    _, problems = frontends([web], [POD_CIDR, IPv4Network("10.245.0.0/16")])
    assert problems == []


@pytest.mark.parametrize("protocol", ["UDP", "SCTP"])
def test_non_tcp_ports_are_reported_and_left_to_kube_proxy(protocol: str) -> None:
    dns = ServicePort(53, 53, name="dns", protocol=protocol)
    web = service(HTTP, dns, endpoints=[endpoint("10.244.0.2", {"http": 8080, "dns": 53})])
    found, problems = frontends([web], [POD_CIDR], NODE_IPS)
    assert [f.port for f in found] == [80]
    [problem] = problems
    assert (problem.service, problem.problem) == ("default/web", Problem.PROTOCOL_NOT_STEERED)
    assert f"dns/{protocol}" in problem.message
    assert "kube-proxy" in problem.message


def test_a_non_tcp_node_port_gets_no_node_frontend_either() -> None:
    dns = ServicePort(53, 53, name="", protocol="UDP", node_port=30053)
    web = service(dns, type=ServiceType.NODE_PORT, endpoints=[endpoint("10.244.0.2", {"": 53})])
    found, problems = frontends([web], [POD_CIDR], NODE_IPS)
    assert found == []
    assert [p.problem for p in problems] == [Problem.PROTOCOL_NOT_STEERED]
    assert "53/UDP" in problems[0].message


def test_a_headless_service_has_no_cluster_ip_frontend() -> None:
    headless = service(cluster_ip=None, endpoints=[endpoint("10.244.0.2", {"http": 8080})])
    found, problems = frontends([headless], [POD_CIDR], NODE_IPS)
    assert found == []
    assert problems == []


def test_more_than_max_backends_are_capped_to_the_lowest_addresses_and_reported() -> None:
    base = int(ip("10.244.0.0"))
    # Listed highest address first, so the cap has to sort to keep the lowest ones.
    many = [endpoint(str(IPv4Address(base + 1 + i)), {"http": 8080}) for i in range(MAX_BACKENDS)]
    many.append(endpoint(str(IPv4Address(base)), {"http": 8080}))
    many.reverse()
    assert len(many) == MAX_BACKENDS + 1
    found, problems = frontends([service(endpoints=many)], [POD_CIDR])
    [frontend] = found
    assert len(frontend.backends) == MAX_BACKENDS
    assert [b.ip for b in frontend.backends] == [IPv4Address(base + i) for i in range(MAX_BACKENDS)]
    [problem] = problems
    assert problem.problem is Problem.TOO_MANY_BACKENDS
    assert str(MAX_BACKENDS + 1) in problem.message
    assert str(MAX_BACKENDS) in problem.message


def test_exactly_max_backends_fit_without_a_problem() -> None:
    base = int(ip("10.244.0.1"))
    many = [endpoint(str(IPv4Address(base + i)), {"http": 8080}) for i in range(MAX_BACKENDS)]
    found, problems = frontends([service(endpoints=many)], [POD_CIDR])
    assert len(found[0].backends) == MAX_BACKENDS
    assert problems == []


def test_problems_name_their_service() -> None:
    a = service(name="a", namespace="shop")
    b = service(ServicePort(53, 53, protocol="UDP"), name="b", cluster_ip=ip("10.96.0.11"))
    _, problems = frontends([b, a], [POD_CIDR])
    assert [(p.service, p.problem) for p in problems] == [
        ("default/b", Problem.PROTOCOL_NOT_STEERED),
        ("shop/a", Problem.NO_READY_ENDPOINTS),
    ]


# --- frontends: ordering -------------------------------------------------------------------


def several_services() -> list[Service]:
    return [
        service(
            HTTP,
            ServicePort(9100, 9100, name="metrics", node_port=30910),
            name=name,
            namespace=namespace,
            cluster_ip=ip(f"10.96.0.{index + 10}"),
            type=ServiceType.NODE_PORT,
            endpoints=[
                endpoint(f"10.244.{index}.{n}", {"http": 8080 + n, "metrics": 9100})
                for n in range(1, 4)
            ],
        )
        for index, (namespace, name) in enumerate(
            [("shop", "web"), ("default", "web"), ("default", "api"), ("a", "z")]
        )
    ]


def test_frontends_are_sorted_by_service_whatever_the_input_order() -> None:
    services = several_services()
    expected = frontends(services, [POD_CIDR], NODE_IPS)
    assert [f.service for f in expected[0][::4]] == [
        "a/z",
        "default/api",
        "default/web",
        "shop/web",
    ]
    shuffler = random.Random(7)
    for _ in range(10):
        shuffled = services[:]
        shuffler.shuffle(shuffled)
        assert frontends(shuffled, [POD_CIDR], NODE_IPS) == expected


def test_backends_do_not_depend_on_the_order_endpoints_are_listed() -> None:
    services = several_services()
    expected = frontends(services, [POD_CIDR], NODE_IPS)[0]
    shuffler = random.Random(7)
    for _ in range(10):
        shuffled = []
        for s in services:
            listed = list(s.endpoints)
            shuffler.shuffle(listed)
            shuffled.append(replace(s, endpoints=tuple(listed)))
        assert frontends(shuffled, [POD_CIDR], NODE_IPS)[0] == expected


# --- endpoints_from_pods -------------------------------------------------------------------


def pod(
    name: str,
    address: str,
    labels: Mapping[str, str],
    named_ports: Mapping[str, int] | None = None,
    *,
    namespace: str = "default",
    ready: bool = True,
) -> PodPorts:
    return PodPorts(f"{namespace}/{name}", namespace, ip(address), labels, named_ports or {}, ready)


WEB_PODS = [
    pod("web-a", "10.244.0.2", {"app": "web"}, {"http": 8080}),
    pod("web-b", "10.244.0.3", {"app": "web", "tier": "front"}, {"http": 9090}),
    pod("api", "10.244.0.4", {"app": "api"}, {"http": 7000}),
    pod("web-c", "10.244.0.5", {"app": "web"}, {"http": 8080}, namespace="shop"),
    pod("web-d", "10.244.0.6", {"app": "webx"}, {"http": 8080}),
]


def test_the_selector_picks_matching_pods_of_the_services_namespace_only() -> None:
    web = service(selector={"app": "web"})
    assert endpoints_from_pods(web, WEB_PODS) == (
        Endpoint(ip("10.244.0.2"), {"http": 8080}, True, "default/web-a"),
        Endpoint(ip("10.244.0.3"), {"http": 9090}, True, "default/web-b"),
    )
    shop = service(selector={"app": "web"}, namespace="shop")
    assert [e.pod for e in endpoints_from_pods(shop, WEB_PODS)] == ["shop/web-c"]


def test_every_selector_label_must_match() -> None:
    front = service(selector={"app": "web", "tier": "front"})
    assert [e.pod for e in endpoints_from_pods(front, WEB_PODS)] == ["default/web-b"]


def test_an_empty_selector_selects_nothing() -> None:
    assert endpoints_from_pods(service(selector={}), WEB_PODS) == ()


def test_a_service_without_selector_keeps_its_own_endpoints() -> None:
    given = (endpoint("192.168.7.7", {"http": 80}),)
    legacy = service(endpoints=given, selector=None)
    assert endpoints_from_pods(legacy, WEB_PODS) == given


def test_named_targets_resolve_through_each_pods_ports_and_numbers_stay() -> None:
    web = service(
        HTTP,
        ServicePort(9100, 9200, name="metrics"),
        selector={"app": "web"},
    )
    assert [dict(e.ports) for e in endpoints_from_pods(web, WEB_PODS)] == [
        {"http": 8080, "metrics": 9200},
        {"http": 9090, "metrics": 9200},
    ]


def test_a_pod_lacking_the_name_gets_no_entry_for_that_port() -> None:
    pods = [
        pod("web-a", "10.244.0.2", {"app": "web"}, {"http": 8080, "admin": 9000}),
        pod("web-b", "10.244.0.3", {"app": "web"}, {"http": 8080}),
    ]
    web = service(
        HTTP,
        ServicePort(8443, "admin", name="admin"),
        ServicePort(9100, 9100, name="metrics"),
        selector={"app": "web"},
    )
    found = endpoints_from_pods(web, pods)
    assert [dict(e.ports) for e in found] == [
        {"http": 8080, "admin": 9000, "metrics": 9100},
        {"http": 8080, "metrics": 9100},
    ]
    frontend_of = {f.port_name: f for f in frontends([service(*web.ports, endpoints=found)])[0]}
    assert [b.ip for b in frontend_of["admin"].backends] == [ip("10.244.0.2")]
    assert len(frontend_of["http"].backends) == 2


def test_a_pod_with_no_port_resolved_is_still_an_endpoint() -> None:
    pods = [pod("web-a", "10.244.0.2", {"app": "web"})]
    [found] = endpoints_from_pods(service(selector={"app": "web"}), pods)
    assert (found.pod, dict(found.ports)) == ("default/web-a", {})


def test_not_ready_pods_are_endpoints_that_are_not_ready() -> None:
    pods = [
        pod("web-a", "10.244.0.2", {"app": "web"}, {"http": 8080}, ready=False),
        pod("web-b", "10.244.0.3", {"app": "web"}, {"http": 8080}),
    ]
    web = service(selector={"app": "web"})
    found = endpoints_from_pods(web, pods)
    assert [(e.pod, e.ready) for e in found] == [("default/web-a", False), ("default/web-b", True)]
    [frontend] = frontends([service(endpoints=found)])[0]
    assert [b.pod for b in frontend.backends] == ["default/web-b"]


def test_endpoints_are_sorted_by_pod_whatever_the_input_order() -> None:
    web = service(selector={"app": "web"})
    expected = endpoints_from_pods(web, WEB_PODS)
    shuffler = random.Random(3)
    for _ in range(10):
        pods = WEB_PODS[:]
        shuffler.shuffle(pods)
        assert endpoints_from_pods(web, pods) == expected
    assert [e.pod for e in expected] == sorted(e.pod for e in expected)


def test_endpoints_are_frozen_and_hashable() -> None:
    ports = {"http": 8080}
    first = Endpoint(ip("10.244.0.2"), ports)
    ports["http"] = 1
    assert first.ports == {"http": 8080}
    assert first == Endpoint(ip("10.244.0.2"), {"http": 8080})
    assert len({first, Endpoint(ip("10.244.0.2"), {"http": 8080})}) == 1
