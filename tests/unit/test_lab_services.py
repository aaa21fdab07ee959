"""The lab's Services: the `services:` section of a lab file (parsed as Kubernetes would
accept or refuse it, every refusal naming the file and the field), ClusterIP planning, and
the lab state's record of them."""

from __future__ import annotations

import copy
import json
import tempfile
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from steer.constants import LAB_SERVICE_CIDR
from steer.lab.services import (
    LabService,
    LabServiceError,
    default_lab_services,
    plan_cluster_ips,
)
from steer.lab.spec import LabConfig, LabError, LabPod, LabState, lab_config_from_yaml
from steer.model.service import (
    Endpoint,
    PodPorts,
    ServicePort,
    ServiceType,
    frontends,
)

# Hypothesis caches what it learns in .hypothesis/ beside the tests; keep the checkout clean.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "steer-hypothesis"))

SERVICE_NET = IPv4Network(LAB_SERVICE_CIDR)

GOOD = """
pods:
  - {name: web, labels: {app: web}, ports: {http: 8080, metrics: 9100}}
services:
  - name: web
    selector: {app: web}
    ports: [{name: http, port: 80, targetPort: http}]
  - name: multi
    namespace: shop
    selector: {app: web}
    ports:
      - {name: http, port: 80, targetPort: http}
      - {name: metrics, port: 9100, targetPort: 9100, protocol: TCP}
      - {name: dns, port: 53, protocol: UDP}
  - name: np
    type: NodePort
    selector: {app: web}
    ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
  - name: fixed
    clusterIP: 10.96.0.10
    selector: {app: web}
    ports: [{port: 80}]
  - name: headless
    clusterIP: None
    selector: {app: web}
    ports: [{port: 80}]
  - name: legacy
    namespace: db
    ports: [{port: 5432}]
    endpoints: [{ip: 10.244.0.9, ports: {"": 5432}}, {ip: 192.168.7.7, ports: {"": 5433}}]
  - name: web
    namespace: shop
    type: LoadBalancer
    selector: {}
    ports: [{name: http, port: 80, nodePort: 32767}]
"""

EXPECTED = [
    LabService(
        name="web",
        namespace="default",
        selector={"app": "web"},
        ports=(ServicePort(80, "http", name="http"),),
    ),
    LabService(
        name="multi",
        namespace="shop",
        selector={"app": "web"},
        ports=(
            ServicePort(80, "http", name="http"),
            ServicePort(9100, 9100, name="metrics"),
            ServicePort(53, 53, name="dns", protocol="UDP"),
        ),
    ),
    LabService(
        name="np",
        namespace="default",
        type=ServiceType.NODE_PORT,
        selector={"app": "web"},
        ports=(ServicePort(80, "http", name="http", node_port=30080),),
    ),
    LabService(
        name="fixed",
        namespace="default",
        cluster_ip="10.96.0.10",
        selector={"app": "web"},
        ports=(ServicePort(80, 80),),
    ),
    LabService(
        name="headless",
        namespace="default",
        cluster_ip=None,
        selector={"app": "web"},
        ports=(ServicePort(80, 80),),
    ),
    LabService(
        name="legacy",
        namespace="db",
        ports=(ServicePort(5432, 5432),),
        endpoints=(
            Endpoint(IPv4Address("10.244.0.9"), {"": 5432}),
            Endpoint(IPv4Address("192.168.7.7"), {"": 5433}),
        ),
    ),
    LabService(
        name="web",
        namespace="shop",
        type=ServiceType.LOAD_BALANCER,
        selector={},
        ports=(ServicePort(80, 80, name="http", node_port=32767),),
    ),
]


def parse(text: str) -> LabConfig:
    return lab_config_from_yaml(text, "lab.yaml")


# --- parsing -------------------------------------------------------------------------------


def test_a_lab_file_with_services_parses() -> None:
    config = parse(GOOD)
    assert config.services == EXPECTED
    assert [p.name for p in config.pods] == ["web"]
    assert dict(config.pods[0].ports) == {"http": 8080, "metrics": 9100}


def test_a_lab_file_without_services_has_none() -> None:
    assert parse("pods: [{name: a}]").services == []
    assert parse("pods: [{name: a}]\nservices:\n").services == []


def test_parsed_selectors_are_kept_apart_from_absent_ones() -> None:
    by_name = {s.key: s for s in parse(GOOD).services}
    assert by_name["db/legacy"].selector is None
    assert by_name["shop/web"].selector == {}
    assert by_name["default/web"].selector == {"app": "web"}


def test_parsed_services_model_the_lab_pods() -> None:
    """The lab as the endpoints controller: a named targetPort resolves through the pod's
    named ports, a numbered one is kept, and selector-less Services keep their endpoints."""
    pods = [
        PodPorts(
            "default/web", "default", IPv4Address("10.244.0.3"), {"app": "web"}, {"http": 8080}
        ),
        PodPorts("shop/web", "shop", IPv4Address("10.244.0.4"), {"app": "web"}, {"http": 8081}),
    ]
    planned = plan_cluster_ips(parse(GOOD).services, {})
    models = [s.model(pods) for s in planned]
    found, _ = frontends(models, [IPv4Network("10.244.0.0/16")], [IPv4Address("10.244.0.1")])
    got = {(f.service, str(f.ip), f.port): [(str(b.ip), b.port) for b in f.backends] for f in found}
    assert got[("default/web", planned[0].cluster_ip, 80)] == [("10.244.0.3", 8080)]
    assert got[("shop/multi", planned[1].cluster_ip, 80)] == [("10.244.0.4", 8081)]
    assert got[("shop/multi", planned[1].cluster_ip, 9100)] == [("10.244.0.4", 9100)]
    assert got[("default/np", "10.244.0.1", 30080)] == [("10.244.0.3", 8080)]
    assert got[("default/fixed", "10.96.0.10", 80)] == [("10.244.0.3", 80)]
    assert got[("db/legacy", planned[5].cluster_ip, 5432)] == [
        ("10.244.0.9", 5432),
        ("192.168.7.7", 5433),
    ]
    assert got[("shop/web", "10.244.0.1", 32767)] == []  # an empty selector selects nothing
    assert not any(s == "default/headless" for s, _, _ in got)


def test_the_same_name_in_two_namespaces_is_two_services() -> None:
    config = parse(
        "services:\n"
        "  - {name: web, ports: [{port: 80}]}\n"
        "  - {name: web, namespace: shop, ports: [{port: 80}]}\n"
    )
    assert [s.key for s in config.services] == ["default/web", "shop/web"]


def one(**fields: Any) -> str:
    """A lab file with one Service `web` (one port 80 unless given), changed by `fields`."""
    service: dict[str, Any] = {"name": "web", "ports": [{"port": 80}]} | fields
    return yaml.safe_dump({"services": [service]}, sort_keys=False)


def ports(*entries: dict[str, Any], **fields: Any) -> str:
    return one(ports=list(entries), **fields)


HTTP = {"name": "http", "port": 80}

BAD = [
    # port numbers
    pytest.param(ports({"port": 0}), "services[0].ports[0].port", "from 1 to 65535", id="port-0"),
    pytest.param(ports({"port": 70000}), "services[0].ports[0].port", "70000", id="port-70000"),
    pytest.param(ports({"port": "80"}), "services[0].ports[0].port", "'80'", id="port-string"),
    pytest.param(ports({"port": True}), "services[0].ports[0].port", "True", id="port-bool"),
    pytest.param(ports({"name": "a"}), "services[0].ports[0].port", "None", id="port-missing"),
    pytest.param(
        ports(HTTP, {"name": "b", "port": 81, "targetPort": 0}),
        "services[0].ports[1].targetPort",
        "from 1 to 65535",
        id="targetPort-0",
    ),
    # target port names
    pytest.param(
        ports(HTTP, {"name": "b", "port": 81, "targetPort": "HTTP"}),
        "services[0].ports[1].targetPort",
        "'HTTP' is neither a port number nor a container port name",
        id="targetPort-uppercase",
    ),
    pytest.param(
        ports({"port": 80, "targetPort": "a-very-long-name"}),
        "services[0].ports[0].targetPort",
        "up to 15",
        id="targetPort-16-chars",
    ),
    pytest.param(
        ports({"port": 80, "targetPort": "8080"}),
        "services[0].ports[0].targetPort",
        "at least one letter",
        id="targetPort-digits-only",
    ),
    pytest.param(
        ports({"port": 80, "targetPort": "a--b"}),
        "services[0].ports[0].targetPort",
        "'a--b'",
        id="targetPort-double-dash",
    ),
    pytest.param(
        ports({"port": 80, "targetPort": "-http"}),
        "services[0].ports[0].targetPort",
        "'-http'",
        id="targetPort-leading-dash",
    ),
    pytest.param(
        ports({"port": 80, "targetPort": ""}),
        "services[0].ports[0].targetPort",
        "''",
        id="targetPort-empty",
    ),
    # port names
    pytest.param(
        ports({"name": "Http", "port": 80}),
        "services[0].ports[0].name",
        "not a valid port name",
        id="port-name-uppercase",
    ),
    pytest.param(
        ports({"name": "a" * 64, "port": 80}),
        "services[0].ports[0].name",
        "not a valid port name",
        id="port-name-too-long",
    ),
    pytest.param(
        ports({"name": 7, "port": 80}),
        "services[0].ports[0].name",
        "not a valid port name",
        id="port-name-number",
    ),
    # protocol
    pytest.param(
        ports(HTTP, {"name": "b", "port": 81, "protocol": "HTTP"}),
        "services[0].ports[1].protocol",
        "must be one of TCP, UDP, SCTP, got 'HTTP'",
        id="protocol-http",
    ),
    pytest.param(
        ports({"port": 80, "protocol": "tcp"}),
        "services[0].ports[0].protocol",
        "'tcp'",
        id="protocol-lowercase",
    ),
    # node ports
    pytest.param(
        ports({"port": 80, "nodePort": 30080}),
        "services[0].ports[0].nodePort",
        "only a NodePort Service has node ports",
        id="nodePort-on-ClusterIP",
    ),
    pytest.param(
        ports({"port": 80, "nodePort": 29999}, type="NodePort"),
        "services[0].ports[0].nodePort",
        "from 30000 to 32767",
        id="nodePort-below-range",
    ),
    pytest.param(
        ports(HTTP, {"name": "b", "port": 81, "nodePort": 32768}, type="NodePort"),
        "services[0].ports[1].nodePort",
        "from 30000 to 32767",
        id="nodePort-above-range",
    ),
    pytest.param(
        ports({"port": 80, "nodePort": "30080"}, type="NodePort"),
        "services[0].ports[0].nodePort",
        "'30080'",
        id="nodePort-string",
    ),
    pytest.param(
        ports(
            {"name": "a", "port": 80, "nodePort": 30080},
            {"name": "b", "port": 81, "nodePort": 30080},
            type="NodePort",
        ),
        "services[0].ports",
        "two ports share the nodePort 30080",
        id="nodePort-duplicate",
    ),
    # the ports as a whole
    pytest.param(
        ports({"name": "a", "port": 80}, {"name": "a", "port": 81}),
        "services[0].ports",
        "two ports share the name 'a'",
        id="duplicate-port-names",
    ),
    pytest.param(
        ports({"name": "a", "port": 80}, {"name": "b", "port": 80}),
        "services[0].ports",
        "two ports share the port (80, 'TCP')",
        id="duplicate-port-numbers",
    ),
    pytest.param(
        ports({"name": "a", "port": 80}, {"port": 81}),
        "services[0].ports",
        "every port of a multi-port Service needs a name",
        id="unnamed-port-in-multi-port",
    ),
    pytest.param(ports(), "services[0].ports", "at least one port", id="no-ports"),
    pytest.param(one(ports={"port": 80}), "services[0].ports", "a list", id="ports-mapping"),
    pytest.param(
        ports(HTTP, 80), "services[0].ports[1]", "must be a mapping", id="port-not-mapping"
    ),
    # clusterIP
    pytest.param(
        one(clusterIP="10.97.0.1"),
        "services[0].clusterIP",
        f"10.97.0.1 is not an assignable address of the lab's Service range {LAB_SERVICE_CIDR}",
        id="clusterIP-outside-range",
    ),
    pytest.param(
        one(clusterIP="10.244.0.3"),
        "services[0].clusterIP",
        "not an assignable address",
        id="clusterIP-a-pod-address",
    ),
    pytest.param(
        one(clusterIP="garbage"),
        "services[0].clusterIP",
        "'garbage' is not an IPv4 address",
        id="clusterIP-garbage",
    ),
    pytest.param(
        one(clusterIP="10.96.0.300"),
        "services[0].clusterIP",
        "not an IPv4 address",
        id="clusterIP-bad-octet",
    ),
    pytest.param(
        one(clusterIP="10.96.0.0/16"),
        "services[0].clusterIP",
        "not an IPv4 address",
        id="clusterIP-cidr",
    ),
    pytest.param(
        one(clusterIP="none"),
        "services[0].clusterIP",
        "not an IPv4 address, 'None' or empty",
        id="clusterIP-lowercase-none",
    ),
    pytest.param(
        one(clusterIP=[]), "services[0].clusterIP", "not an IPv4 address", id="clusterIP-list"
    ),
    pytest.param(
        one(clusterIP="None", type="NodePort"),
        "services[0].clusterIP",
        "a headless Service cannot be a NodePort Service",
        id="headless-NodePort",
    ),
    # selector and endpoints
    pytest.param(
        one(selector={"app": "web"}, endpoints=[{"ip": "10.244.0.9", "ports": {"": 80}}]),
        "services[0].endpoints",
        "a Service with a selector gets its endpoints from its pods",
        id="selector-and-endpoints",
    ),
    pytest.param(
        one(selector={"app": 1}), "services[0].selector", "strings to strings", id="selector-int"
    ),
    pytest.param(
        one(selector=None), "services[0].selector", "strings to strings", id="selector-null"
    ),
    pytest.param(
        one(endpoints=[{"ip": "10.244.0.300"}]),
        "services[0].endpoints[0].ip",
        "not an IPv4 address",
        id="endpoint-bad-ip",
    ),
    pytest.param(
        one(endpoints=[{"ip": "10.244.0.9", "ports": {"": 0}}]),
        "services[0].endpoints[0].ports.",
        "from 1 to 65535",
        id="endpoint-port-0",
    ),
    pytest.param(
        one(endpoints=[{"ip": "10.244.0.9"}, {"ip": "10.244.0.8", "port": 80}]),
        "services[0].endpoints[1]",
        "an endpoint is {ip",
        id="endpoint-unknown-field",
    ),
    pytest.param(
        one(endpoints=[{"ip": "10.244.0.9", "ports": [80]}]),
        "services[0].endpoints[0].ports",
        "must map port names to numbers",
        id="endpoint-ports-list",
    ),
    # names and type
    pytest.param(one(name="Web"), "services[0].name", "DNS-1035", id="name-uppercase"),
    pytest.param(one(name="1web"), "services[0].name", "DNS-1035", id="name-leading-digit"),
    pytest.param(one(name="w" * 64), "services[0].name", "DNS-1035", id="name-too-long"),
    pytest.param(one(name="web.a"), "services[0].name", "DNS-1035", id="name-dotted"),
    pytest.param(
        one(namespace="Shop"), "services[0].namespace", "not a valid namespace", id="ns-upper"
    ),
    pytest.param(
        one(type="ExternalName"),
        "services[0].type",
        "must be one of ClusterIP, NodePort, LoadBalancer",
        id="type-unknown",
    ),
    pytest.param(one(type=["NodePort"]), "services[0].type", "must be one of", id="type-list"),
    # unknown fields
    pytest.param(
        one(selectr={"app": "web"}),
        "services[0]",
        "unknown field(s) ['selectr']; fix: remove them",
        id="unknown-service-field",
    ),
    pytest.param(
        ports(HTTP, {"name": "b", "port": 81, "target": 8080}),
        "services[0].ports[1]",
        "unknown field(s) ['target']; fix: remove them",
        id="unknown-port-field",
    ),
    pytest.param(
        yaml.safe_dump({"services": [{"ports": [{"port": 80}]}]}),
        "services[0]",
        "needs at least a 'name'",
        id="no-name",
    ),
    pytest.param(
        "services: [{name: a, ports: [{port: 80}]}, web]",
        "services[1]",
        "needs at least a 'name'",
        id="service-not-mapping",
    ),
    # across Services
    pytest.param(
        "services:\n"
        "  - {name: web, ports: [{port: 80}]}\n"
        "  - {name: api, ports: [{port: 80}]}\n"
        "  - {name: web, namespace: default, ports: [{port: 81}]}\n",
        "services[2]",
        "a second Service default/web",
        id="duplicate-service",
    ),
]


@pytest.mark.parametrize("text, path, message", BAD)
def test_bad_services_name_the_file_and_the_field(text: str, path: str, message: str) -> None:
    with pytest.raises(LabError) as info:
        parse(text)
    text_of = str(info.value)
    assert text_of.startswith(f"lab.yaml: {path}"), text_of
    assert message in text_of, text_of


@pytest.mark.parametrize("value", ["web", {"name": "web"}, 3])
def test_services_must_be_a_list(value: object) -> None:
    with pytest.raises(LabError, match=r"^lab\.yaml: 'services' must be a list"):
        parse(yaml.safe_dump({"services": value}))


@pytest.mark.parametrize("node_port", [30000, 32767])
def test_node_ports_at_the_edges_of_the_range_are_accepted(node_port: int) -> None:
    [service] = parse(ports({"port": 80, "nodePort": node_port}, type="NodePort")).services
    assert service.ports[0].node_port == node_port


def test_one_port_number_for_two_protocols_is_accepted() -> None:
    [service] = parse(
        ports({"name": "dns", "port": 53}, {"name": "dns-udp", "port": 53, "protocol": "UDP"})
    ).services
    assert [(p.port, p.protocol) for p in service.ports] == [(53, "TCP"), (53, "UDP")]


@pytest.mark.parametrize("value", [None, ""])
def test_an_empty_cluster_ip_is_left_to_plan(value: object) -> None:
    [service] = parse(one(clusterIP=value)).services
    assert service.cluster_ip == ""


# Bugs: each test says what Kubernetes (or the parser's own contract) requires.


@pytest.mark.parametrize("value", [5, 1.5, True])
def test_scalar_endpoints_are_refused_with_a_lab_error(value: object) -> None:
    with pytest.raises(LabError) as info:
        parse(one(endpoints=value))
    assert str(info.value).startswith("lab.yaml: services[0].endpoints")


@pytest.mark.parametrize(
    "text, path",
    [
        (one(name="web\n"), "services[0].name"),
        (one(namespace="default\n"), "services[0].namespace"),
        (ports({"name": "http\n", "port": 80}), "services[0].ports[0].name"),
        (ports({"port": 80, "targetPort": "http\n"}), "services[0].ports[0].targetPort"),
    ],
    ids=["name", "namespace", "port-name", "targetPort"],
)
def test_a_trailing_newline_is_not_a_valid_name(text: str, path: str) -> None:
    with pytest.raises(LabError) as info:
        parse(text)
    assert str(info.value).startswith(f"lab.yaml: {path}")


def test_two_services_cannot_share_a_node_port() -> None:
    text = (
        "services:\n"
        "  - {name: a, type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n"
        "  - {name: b, type: NodePort, ports: [{port: 81, nodePort: 30080}]}\n"
    )
    with pytest.raises(LabError, match=r"^lab\.yaml: services\[1\]"):
        parse(text)


def test_a_numeric_cluster_ip_is_refused() -> None:
    with pytest.raises(LabError, match=r"^lab\.yaml: services\[0\]\.clusterIP"):
        parse(one(clusterIP=int(IPv4Address("10.96.0.10"))))


@pytest.mark.parametrize("address", ["10.96.0.0", "10.96.255.255"])
def test_the_ranges_network_and_broadcast_addresses_are_refused(address: str) -> None:
    with pytest.raises(LabError, match=r"^lab\.yaml: services\[0\]\.clusterIP"):
        parse(one(clusterIP=address))


# --- plan_cluster_ips ----------------------------------------------------------------------


def svc(name: str, cluster_ip: str | None = "", namespace: str = "default") -> LabService:
    return LabService(
        name=name, namespace=namespace, ports=(ServicePort(80, 80),), cluster_ip=cluster_ip
    )


def ips(services: list[LabService]) -> dict[str, str | None]:
    return {s.key: s.cluster_ip for s in services}


def test_new_services_get_addresses_from_the_service_cidr() -> None:
    planned = plan_cluster_ips([svc("a"), svc("b"), svc("c")], {})
    assert ips(planned) == {
        "default/a": "10.96.0.1",
        "default/b": "10.96.0.2",
        "default/c": "10.96.0.3",
    }


def test_services_keep_the_addresses_they_had() -> None:
    current = {"default/a": "10.96.0.7", "default/b": "10.96.3.4"}
    planned = plan_cluster_ips([svc("b"), svc("a"), svc("c")], current)
    assert ips(planned) == {
        "default/b": "10.96.3.4",
        "default/a": "10.96.0.7",
        "default/c": "10.96.0.1",
    }


def test_fixed_and_headless_services_keep_what_they_asked_for() -> None:
    planned = plan_cluster_ips(
        [svc("a", "10.96.0.1"), svc("h", None), svc("b")], {"default/h": "10.96.0.9"}
    )
    assert ips(planned) == {"default/a": "10.96.0.1", "default/h": None, "default/b": "10.96.0.2"}


def test_planning_keeps_everything_but_the_address() -> None:
    planned = plan_cluster_ips(EXPECTED, {})
    for before, after in zip(EXPECTED, planned, strict=True):
        assert (after.name, after.namespace, after.ports, after.type) == (
            before.name,
            before.namespace,
            before.ports,
            before.type,
        )
        assert (after.selector, after.endpoints) == (before.selector, before.endpoints)


def test_two_services_fixing_one_address_are_refused() -> None:
    with pytest.raises(LabServiceError) as info:
        plan_cluster_ips([svc("a", "10.96.0.10"), svc("b"), svc("c", "10.96.0.10")], {})
    assert "default/a" in str(info.value)
    assert "default/c" in str(info.value)
    assert "10.96.0.10" in str(info.value)


def test_a_new_service_never_gets_an_address_a_later_service_keeps() -> None:
    planned = plan_cluster_ips([svc("new"), svc("old")], {"default/old": "10.96.0.1"})
    assert ips(planned) == {"default/new": "10.96.0.2", "default/old": "10.96.0.1"}


def test_a_new_service_never_gets_an_address_a_later_service_fixes() -> None:
    planned = plan_cluster_ips([svc("new"), svc("fixed", "10.96.0.1")], {})
    assert ips(planned) == {"default/new": "10.96.0.2", "default/fixed": "10.96.0.1"}


def test_a_kept_address_another_service_now_fixes_moves() -> None:
    planned = plan_cluster_ips([svc("a"), svc("b", "10.96.0.5")], {"default/a": "10.96.0.5"})
    assert ips(planned) == {"default/a": "10.96.0.1", "default/b": "10.96.0.5"}


def test_a_kept_address_outside_the_service_cidr_is_replaced() -> None:
    planned = plan_cluster_ips([svc("a")], {"default/a": "10.0.0.5"})
    assert ips(planned) == {"default/a": "10.96.0.1"}


@settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    wanted=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e", "f"]),
            st.one_of(st.just(""), st.none(), st.integers(1, 8).map(lambda n: f"10.96.0.{n}")),
        ),
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    current=st.dictionaries(
        st.sampled_from(["default/a", "default/b", "default/c", "default/z"]),
        st.one_of(st.integers(1, 8).map(lambda n: f"10.96.0.{n}"), st.just("10.0.0.1")),
    ),
)
def test_planned_addresses_are_unique_kept_and_in_range(
    wanted: list[tuple[str, str | None]], current: dict[str, str]
) -> None:
    services = [svc(name, ip) for name, ip in wanted]
    fixed = [ip for _, ip in wanted if ip]
    if len(fixed) != len(set(fixed)):
        with pytest.raises(LabServiceError):
            plan_cluster_ips(services, current)
        return
    planned = plan_cluster_ips(services, current)
    assert [s.key for s in planned] == [s.key for s in services]
    given_ips = [s.cluster_ip for s in planned if s.cluster_ip is not None]
    assert len(given_ips) == len(set(given_ips))
    assert all(IPv4Address(a) in SERVICE_NET for a in given_ips)
    for before, after in zip(services, planned, strict=True):
        if before.cluster_ip != "":
            assert after.cluster_ip == before.cluster_ip
            continue
        kept = current.get(before.key)
        if kept in fixed or (kept and IPv4Address(kept) not in SERVICE_NET):
            assert after.cluster_ip != kept
        elif kept and list(current.values()).count(kept) == 1:
            assert after.cluster_ip == kept
        if after.cluster_ip != kept:
            # A new address is nobody's: not fixed, and not held by any Service (one
            # listed later, or one deleted since the last `lab up`).
            assert after.cluster_ip not in set(current.values())
            assert after.cluster_ip not in fixed


# --- the state file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "service",
    [*plan_cluster_ips(EXPECTED, {}), *EXPECTED, *default_lab_services()],
    ids=lambda s: f"{s.key}:{s.cluster_ip!r}",
)
def test_a_service_survives_its_json(service: LabService) -> None:
    document = json.loads(json.dumps(service.to_json()))
    assert LabService.from_json(document) == service
    assert LabService.from_json(document).to_json() == service.to_json()


def test_a_service_json_is_what_the_state_file_documents() -> None:
    [np] = [s for s in EXPECTED if s.name == "np"]
    assert np.to_json() == {
        "name": "np",
        "namespace": "default",
        "type": "NodePort",
        "cluster_ip": "",
        "selector": {"app": "web"},
        "ports": [
            {
                "name": "http",
                "port": 80,
                "target_port": "http",
                "protocol": "TCP",
                "node_port": 30080,
            }
        ],
        "endpoints": [],
    }


def lab_state() -> LabState:
    pods = (
        LabPod(
            name="web",
            namespace="default",
            ip="10.244.0.3",
            netns="steer-pod-default-web",
            cgroup="/sys/fs/cgroup/steer/default-web",
            veth="spaaaaaaaa",
            labels={"app": "web"},
            annotations={"steer.dev/dataplane": "ebpf"},
            namespace_labels={"team": "a"},
            ports={"http": 8080, "metrics": 9100},
        ),
        LabPod(
            name="client",
            namespace="shop",
            ip="10.244.0.2",
            netns="steer-pod-shop-client",
            cgroup="/sys/fs/cgroup/steer/shop-client",
            veth="spbbbbbbbb",
        ),
    )
    return LabState(
        node_netns="steer-node",
        node_name="lab",
        gateway_ip="10.244.0.1",
        pod_cidr="10.244.0.0/16",
        pods=pods,
        node_cgroup="/sys/fs/cgroup/steer/node",
        services=tuple(plan_cluster_ips(EXPECTED, {})),
    )


def test_the_lab_state_survives_its_json_with_services_and_named_ports() -> None:
    state = lab_state()
    text = json.dumps(state.to_json())
    again = LabState.from_text(text)
    assert again == state
    assert again is not None
    assert dict(again.pod("default", "web").ports) == {"http": 8080, "metrics": 9100}
    assert dict(again.pod("shop", "client").ports) == {}
    assert again.services == state.services
    assert json.loads(json.dumps(again.to_json())) == json.loads(text)


def test_a_lab_state_without_services_has_none() -> None:
    document = lab_state().to_json()
    del document["services"]  # type: ignore[misc]
    again = LabState.from_json(document)
    assert again.services == ()


def test_a_lab_state_with_a_malformed_service_is_refused() -> None:
    document: Any = lab_state().to_json()
    del document["services"][0]["ports"]
    with pytest.raises(ValueError, match="lab state malformed"):
        LabState.from_text(json.dumps(document))


# --- fuzzing -------------------------------------------------------------------------------

FIELDS = [
    "name", "namespace", "selector", "type", "clusterIP", "ports", "endpoints", "port",
    "targetPort", "protocol", "nodePort", "ip", "app", "",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(min_value=0, max_value=70000),
    st.floats(allow_nan=True),
    # No lone surrogates: YAML cannot write them.
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.sampled_from(
        [
            "web", "Web", "default", "None", "none", "10.96.0.10", "10.96.0.0", "10.244.0.9",
            "NodePort", "ClusterIP", "LoadBalancer", "TCP", "UDP", "HTTP", "http", "8080",
            "web\n", "a--b", "-", "", "0x50",
        ]
    ),
)  # fmt: skip
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=5))
YAML_DATA = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=6)),
    max_leaves=16,
)
SMALL_DATA = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=4,
)
LAB_PODS = [
    PodPorts("default/web", "default", IPv4Address("10.244.0.3"), {"app": "web"}, {"http": 8080}),
    PodPorts("default/api", "default", IPv4Address("10.244.0.4"), {"app": "api"}, {}),
]


def parses_or_refuses(services: object) -> None:
    """The property: a LabConfig, or a LabError naming the file; and what parses plans,
    survives the state file and models without raising."""
    text = yaml.safe_dump({"services": services}, sort_keys=False, allow_unicode=True)
    try:
        config = lab_config_from_yaml(text, "fuzz.yaml")
    except LabError as exc:
        assert str(exc).startswith("fuzz.yaml: "), exc
        return
    assert all(isinstance(s, LabService) for s in config.services)
    try:
        planned = plan_cluster_ips(config.services, {})
    except LabServiceError:
        return
    for service in planned:
        assert LabService.from_json(json.loads(json.dumps(service.to_json()))) == service
    frontends([s.model(LAB_PODS) for s in planned], [IPv4Network("10.244.0.0/16")])


FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(YAML_DATA)
def test_any_services_value_parses_or_is_refused(services: object) -> None:
    parses_or_refuses(services)


@FUZZ
@given(st.lists(st.dictionaries(KEYS, SMALL_DATA, max_size=7), max_size=3))
def test_any_list_of_mappings_parses_or_is_refused(services: list[dict[str, Any]]) -> None:
    parses_or_refuses(services)


VALID_SERVICES: list[dict[str, Any]] = [
    {
        "name": "web",
        "namespace": "default",
        "type": "NodePort",
        "clusterIP": "10.96.0.10",
        "selector": {"app": "web"},
        "ports": [
            {
                "name": "http",
                "port": 80,
                "targetPort": "http",
                "protocol": "TCP",
                "nodePort": 30080,
            },
            {"name": "metrics", "port": 9100, "targetPort": 9100, "nodePort": 30091},
        ],
    },
    {
        "name": "db",
        "ports": [{"port": 5432}],
        "endpoints": [{"ip": "10.244.0.9", "ports": {"": 5432}}],
    },
    {
        "name": "headless",
        "clusterIP": "None",
        "selector": {"app": "api"},
        "ports": [{"port": 7000}],
    },
]


SERVICE_FIELDS = ["name", "namespace", "selector", "type", "clusterIP", "ports", "endpoints"]
PORT_FIELDS = ["name", "port", "targetPort", "protocol", "nodePort"]
ENDPOINT_FIELDS = ["ip", "ports"]


def mutation_targets() -> list[tuple[Any, ...]]:
    """Every field of every Service, port and endpoint of VALID_SERVICES, set or not: a
    path to a mapping and the key to set there."""
    targets: list[tuple[Any, ...]] = []
    for i, service in enumerate(VALID_SERVICES):
        targets += [(i, key) for key in SERVICE_FIELDS]
        for j, _ in enumerate(service["ports"]):
            targets += [(i, "ports", j, key) for key in PORT_FIELDS]
        for j, _ in enumerate(service.get("endpoints", [])):
            targets += [(i, "endpoints", j, key) for key in ENDPOINT_FIELDS]
    return targets


def test_the_valid_services_used_for_mutation_are_valid() -> None:
    config = lab_config_from_yaml(yaml.safe_dump({"services": VALID_SERVICES}), "fuzz.yaml")
    assert [s.key for s in config.services] == ["default/web", "default/db", "default/headless"]


@FUZZ
@given(st.data())
def test_a_valid_lab_file_with_one_value_replaced_parses_or_is_refused(
    data: st.DataObject,
) -> None:
    """Valid Services with one field of a Service, port or endpoint set to anything, or
    removed: this reaches every check past the first, which arbitrary data rarely does."""
    services = copy.deepcopy(VALID_SERVICES)
    path = data.draw(st.sampled_from(mutation_targets()))
    parent: Any = services
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and path[-1] in parent:
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(st.one_of(SCALARS, SMALL_DATA))
    parses_or_refuses(services)
