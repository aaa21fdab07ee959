"""Services, Endpoints and EndpointSlices, shaped as the API server sends them, to the
Service model; and no input, however malformed, makes the converters raise."""

from __future__ import annotations

import copy
import tempfile
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from steer.model.service import (
    Backend,
    Endpoint,
    Service,
    ServicePort,
    ServiceType,
    frontends,
)
from steer.source.kubeservices import (
    ServiceParse,
    endpoints_from_endpoints_object,
    endpoints_from_slices,
    service_from_object,
    services_from_objects,
)

set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "steer-hypothesis"))

# --- fixtures, as `kubectl get -o json` shows them -----------------------------------------


def metadata(name: str, namespace: str = "shop", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "uid": "0b7c4a1e-3f5d-4e2a-9c61-1d2e3f4a5b6c",
        "resourceVersion": "81234",
        "creationTimestamp": "2026-03-02T09:14:07Z",
        **extra,
    }


def api_service(name: str, spec: dict[str, Any], namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, namespace, labels={"app.kubernetes.io/name": name}),
        "spec": {
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            **spec,
        },
        "status": {"loadBalancer": {}},
    }


WEB = api_service(
    "web",
    {
        "type": "ClusterIP",
        "clusterIP": "10.96.12.34",
        "clusterIPs": ["10.96.12.34"],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "selector": {"app": "web"},
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"},
            {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": 9091},
        ],
    },
)
FRONT = api_service(
    "front",
    {
        "type": "NodePort",
        "clusterIP": "10.96.40.2",
        "clusterIPs": ["10.96.40.2"],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "externalTrafficPolicy": "Cluster",
        "selector": {"app": "front"},
        "ports": [{"protocol": "TCP", "port": 8080, "targetPort": 8080, "nodePort": 30080}],
    },
)
DB = api_service(
    "db",
    {
        "type": "ClusterIP",
        "clusterIP": "None",
        "clusterIPs": ["None"],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "selector": {"app": "db"},
        "ports": [{"name": "pg", "protocol": "TCP", "port": 5432, "targetPort": 5432}],
    },
)
UPSTREAM = api_service(
    "upstream",
    {"type": "ExternalName", "externalName": "api.example.com", "sessionAffinity": "None"},
)
LEGACY = api_service(
    "legacy",
    {
        "type": "ClusterIP",
        "clusterIP": "10.96.7.7",
        "clusterIPs": ["10.96.7.7"],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [{"protocol": "TCP", "port": 5432, "targetPort": 5432}],
    },
)
# Written by hand for the selector-less Service: no targetRef, an address outside the pods.
LEGACY_ENDPOINTS = {
    "apiVersion": "v1",
    "kind": "Endpoints",
    "metadata": metadata("legacy"),
    "subsets": [{"addresses": [{"ip": "192.168.10.5"}], "ports": [{"port": 5432}]}],
}


def pod_ref(name: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "namespace": "shop",
        "name": name,
        "uid": "9a8b7c6d-0000-4000-8000-000000000001",
    }


# Written by the endpoints controller: a pod whose "http" container port is 8081 lands in a
# subset of its own, and one not ready yet in notReadyAddresses.
WEB_ENDPOINTS = {
    "apiVersion": "v1",
    "kind": "Endpoints",
    "metadata": metadata(
        "web",
        labels={"app.kubernetes.io/name": "web"},
        annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-03-02T09:15:00Z"},
    ),
    "subsets": [
        {
            "addresses": [
                {"ip": "10.244.1.5", "nodeName": "node-a", "targetRef": pod_ref("web-7d9f-a1b2c")},
                {"ip": "10.244.2.9", "nodeName": "node-b", "targetRef": pod_ref("web-7d9f-d3e4f")},
            ],
            "notReadyAddresses": [
                {"ip": "10.244.2.7", "nodeName": "node-b", "targetRef": pod_ref("web-7d9f-x9y8z")}
            ],
            "ports": [
                {"name": "metrics", "port": 9091, "protocol": "TCP"},
                {"name": "http", "port": 8080, "protocol": "TCP"},
            ],
        },
        {
            "addresses": [
                {"ip": "10.244.3.4", "nodeName": "node-c", "targetRef": pod_ref("web-old-q1w2e")}
            ],
            "ports": [
                {"name": "metrics", "port": 9091, "protocol": "TCP"},
                {"name": "http", "port": 8081, "protocol": "TCP"},
            ],
        },
    ],
}


def api_slice(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    *,
    address_type: str = "IPv4",
    version: str = "v1",
) -> dict[str, Any]:
    return {
        "apiVersion": f"discovery.k8s.io/{version}",
        "kind": "EndpointSlice",
        "metadata": metadata(
            name,
            labels={
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            generateName=f"{service}-",
            ownerReferences=[
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": "0b7c4a1e-3f5d-4e2a-9c61-1d2e3f4a5b6c",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        ),
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


def slice_endpoint(ip: str, pod: str, node: str, **conditions: bool) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": conditions,
        "nodeName": node,
        "zone": "zone-a",
        "targetRef": pod_ref(pod),
    }


WEB_PORTS = [
    {"name": "http", "protocol": "TCP", "port": 8080},
    {"name": "metrics", "protocol": "TCP", "port": 9091},
]
WEB_SLICE = api_slice(
    "web-abc12",
    "web",
    [
        slice_endpoint("10.244.1.5", "web-7d9f-a1b2c", "node-a", ready=True, serving=True),
        slice_endpoint("10.244.2.7", "web-7d9f-x9y8z", "node-b", ready=False, serving=False),
        # Readiness unknown (no conditions written): the API says to take it as ready.
        {"addresses": ["10.244.2.9"], "conditions": {}, "targetRef": pod_ref("web-7d9f-d3e4f")},
    ],
    WEB_PORTS,
)
WEB_SLICE_V6 = api_slice(
    "web-v6z9q",
    "web",
    [slice_endpoint("fd00:10:244::5", "web-7d9f-a1b2c", "node-a", ready=True)],
    WEB_PORTS,
    address_type="IPv6",
)

# --- Services ------------------------------------------------------------------------------


def test_a_cluster_ip_service_keeps_both_ports_and_both_kinds_of_target() -> None:
    errors: list[str] = []
    service = service_from_object(WEB, errors=errors)
    assert errors == []
    assert service == Service(
        namespace="shop",
        name="web",
        cluster_ip=IPv4Address("10.96.12.34"),
        ports=(
            ServicePort(80, "http", "http", "TCP"),
            ServicePort(9090, 9091, "metrics", "TCP"),
        ),
        selector={"app": "web"},
        type=ServiceType.CLUSTER_IP,
    )


def test_a_node_port_service_keeps_its_node_port() -> None:
    service = service_from_object(FRONT)
    assert service is not None
    assert service.type is ServiceType.NODE_PORT
    assert service.ports == (ServicePort(8080, 8080, "", "TCP", node_port=30080),)


def test_a_headless_service_has_no_cluster_ip_but_is_kept() -> None:
    service = service_from_object(DB)
    assert service is not None
    assert service.cluster_ip is None
    assert service.key == "shop/db"


def test_an_external_name_service_has_no_frontend_and_is_not_an_error() -> None:
    errors: list[str] = []
    assert service_from_object(UPSTREAM, errors=errors) is None
    assert errors == []


def test_an_ipv6_single_stack_service_has_no_frontend_and_is_not_an_error() -> None:
    v6 = copy.deepcopy(WEB)
    v6["spec"] |= {
        "clusterIP": "fd00:10:96::1234",
        "clusterIPs": ["fd00:10:96::1234"],
        "ipFamilies": ["IPv6"],
    }
    errors: list[str] = []
    assert service_from_object(v6, errors=errors) is None
    assert errors == []


def test_a_dual_stack_service_with_ipv6_first_uses_its_ipv4_address() -> None:
    dual = copy.deepcopy(WEB)
    dual["spec"] |= {
        "clusterIP": "fd00:10:96::1234",
        "clusterIPs": ["fd00:10:96::1234", "10.96.12.34"],
        "ipFamilies": ["IPv6", "IPv4"],
        "ipFamilyPolicy": "PreferDualStack",
    }
    service = service_from_object(dual)
    assert service is not None
    assert service.cluster_ip == IPv4Address("10.96.12.34")


def test_defaults_are_the_api_servers() -> None:
    """Type ClusterIP, protocol TCP, targetPort = port, where the object leaves them out."""
    bare = {
        "metadata": {"name": "bare", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 53}]},
    }
    service = service_from_object(bare)
    assert service is not None
    assert (service.type, service.ports) == (ServiceType.CLUSTER_IP, (ServicePort(53, 53),))


@pytest.mark.parametrize("selector", [None, {}], ids=["missing", "empty"])
def test_a_service_without_a_selector_has_selector_none(selector: Any) -> None:
    obj = copy.deepcopy(LEGACY)
    if selector is not None:
        obj["spec"]["selector"] = selector
    service = service_from_object(obj)
    assert service is not None
    assert service.selector is None


def test_a_bad_port_is_left_out_and_named_and_the_others_are_kept() -> None:
    obj = copy.deepcopy(WEB)
    obj["metadata"]["namespace"] = "default"
    obj["spec"]["ports"][1]["port"] = 70000
    errors: list[str] = []
    service = service_from_object(obj, errors=errors)
    assert errors == ["service default/web: spec.ports[1].port: 70000 is not a port number"]
    assert service is not None
    assert [p.name for p in service.ports] == ["http"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "ports", 0, "targetPort"), 0, "spec.ports[0].targetPort: 0 is neither"),
        (("spec", "ports", 0, "targetPort"), "", "spec.ports[0].targetPort: '' is neither"),
        (("spec", "ports", 0, "protocol"), "ICMP", "spec.ports[0].protocol: 'ICMP' is not"),
        (("spec", "ports", 0, "port"), True, "spec.ports[0].port: true is not a port"),
        (("spec", "ports", 0, "port"), "80", "spec.ports[0].port: '80' is not a port"),
        (("spec", "ports", 0, "name"), 7, "spec.ports[0].name: 7 is not a string"),
        (("spec", "ports", 0), "http", "spec.ports[0]: 'http' is not an object"),
        (("spec", "ports"), {"port": 80}, "spec.ports: an object is not a list"),
        (("spec", "selector", "app"), ["web"], "spec.selector['app']: a list is not a string"),
    ],
)
def test_a_malformed_part_of_a_service_is_named_and_the_service_is_kept(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    obj = copy.deepcopy(WEB)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    errors: list[str] = []
    service = service_from_object(obj, errors=errors)
    assert service is not None
    assert len(errors) == 1
    assert errors[0].startswith(f"service shop/web: {message}")


def test_a_bad_node_port_is_dropped_and_the_cluster_ip_port_kept() -> None:
    obj = copy.deepcopy(FRONT)
    obj["spec"]["ports"][0]["nodePort"] = -1
    errors: list[str] = []
    service = service_from_object(obj, errors=errors)
    assert service is not None
    assert service.ports == (ServicePort(8080, 8080),)
    assert errors == [
        "service shop/front: spec.ports[0].nodePort: -1 is not a port number; it is ignored"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"spec": None}, "service shop/web: spec: null is not an object"),
        ({"metadata": {"namespace": "shop"}}, "service (no name): metadata.name: missing"),
        ({"spec": {"type": "Balanced"}}, "service shop/web: spec.type: 'Balanced' is not"),
        ({"spec": {"clusterIP": "10.96.0.300"}}, "service shop/web: spec.clusterIP: '10.96.0.300'"),
        ({"spec": {"clusterIP": ""}}, "service shop/web: spec.clusterIP: '' is not an IP"),
        ({"spec": {"clusterIPs": "10.96.1.1"}}, "service shop/web: spec.clusterIPs: '10.96.1.1'"),
    ],
)
def test_a_service_with_nothing_usable_is_skipped_with_a_message(
    change: dict[str, Any], message: str
) -> None:
    obj = copy.deepcopy(WEB)
    for key, value in change.items():
        obj[key] = value
    errors: list[str] = []
    assert service_from_object(obj, errors=errors) is None
    assert errors
    assert errors[0].startswith(message)


# --- Endpoints -----------------------------------------------------------------------------


def test_endpoints_keep_readiness_ports_and_pods() -> None:
    errors: list[str] = []
    endpoints = endpoints_from_endpoints_object(WEB_ENDPOINTS, errors=errors)
    assert errors == []
    usual, old = {"http": 8080, "metrics": 9091}, {"http": 8081, "metrics": 9091}
    assert endpoints == (
        Endpoint(IPv4Address("10.244.1.5"), usual, True, "shop/web-7d9f-a1b2c"),
        Endpoint(IPv4Address("10.244.2.7"), usual, False, "shop/web-7d9f-x9y8z"),
        Endpoint(IPv4Address("10.244.2.9"), usual, True, "shop/web-7d9f-d3e4f"),
        Endpoint(IPv4Address("10.244.3.4"), old, True, "shop/web-old-q1w2e"),
    )


def test_an_address_split_across_two_subsets_is_one_endpoint_with_both_ports() -> None:
    obj = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": metadata("split"),
        "subsets": [
            {
                "addresses": [{"ip": "10.244.1.5", "targetRef": pod_ref("split-0")}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            },
            {
                "addresses": [{"ip": "10.244.1.5", "targetRef": pod_ref("split-0")}],
                "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            },
        ],
    }
    assert endpoints_from_endpoints_object(obj) == (
        Endpoint(IPv4Address("10.244.1.5"), {"http": 8080, "dns": 5353}, True, "shop/split-0"),
    )


def test_hand_written_endpoints_have_no_pod_and_ipv6_addresses_are_skipped() -> None:
    obj = copy.deepcopy(LEGACY_ENDPOINTS)
    obj["subsets"][0]["addresses"].append({"ip": "fd00::5"})
    errors: list[str] = []
    assert endpoints_from_endpoints_object(obj, errors=errors) == (
        Endpoint(IPv4Address("192.168.10.5"), {"": 5432}),
    )
    assert errors == []


@pytest.mark.parametrize(
    ("ip", "message"),
    [
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
        ("169.254.169.254", "169.254.169.254 is a link-local address"),
        ("0.0.0.0", "0.0.0.0 is the unspecified address"),
        ("10.244.1", "'10.244.1' is not an IP address"),
        (167772161, "167772161 is not an IP address"),
    ],
)
def test_an_address_no_connection_should_go_to_is_refused_by_name(ip: Any, message: str) -> None:
    obj = copy.deepcopy(LEGACY_ENDPOINTS)
    obj["subsets"][0]["addresses"].insert(0, {"ip": ip})
    errors: list[str] = []
    endpoints = endpoints_from_endpoints_object(obj, errors=errors)
    assert [str(e.ip) for e in endpoints] == ["192.168.10.5"]
    assert len(errors) == 1
    assert errors[0].startswith(f"endpoints shop/legacy: subsets[0].addresses[0].ip: {message}")


def test_an_endpoints_object_with_no_subsets_has_no_endpoints() -> None:
    errors: list[str] = []
    obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": metadata("idle")}
    assert endpoints_from_endpoints_object(obj, errors=errors) == ()
    assert errors == []


# --- EndpointSlices ------------------------------------------------------------------------


def test_slices_keep_ready_false_and_take_missing_readiness_as_ready() -> None:
    errors: list[str] = []
    endpoints = endpoints_from_slices([WEB_SLICE], errors=errors)
    assert errors == []
    ports = {"http": 8080, "metrics": 9091}
    assert endpoints == (
        Endpoint(IPv4Address("10.244.1.5"), ports, True, "shop/web-7d9f-a1b2c"),
        Endpoint(IPv4Address("10.244.2.7"), ports, False, "shop/web-7d9f-x9y8z"),
        Endpoint(IPv4Address("10.244.2.9"), ports, True, "shop/web-7d9f-d3e4f"),
    )


def test_an_ipv6_slice_is_ignored() -> None:
    errors: list[str] = []
    assert endpoints_from_slices([WEB_SLICE_V6], errors=errors) == ()
    assert errors == []
    assert endpoints_from_slices([WEB_SLICE, WEB_SLICE_V6]) == endpoints_from_slices([WEB_SLICE])


def test_v1beta1_slices_read_the_same() -> None:
    beta = api_slice(
        "web-beta1",
        "web",
        [
            {
                "addresses": ["10.244.1.5"],
                "conditions": {"ready": True},
                "topology": {"kubernetes.io/hostname": "node-a"},
                "targetRef": pod_ref("web-7d9f-a1b2c"),
            },
            {"addresses": ["10.244.2.7"], "conditions": {"ready": False}},
        ],
        WEB_PORTS,
        version="v1beta1",
    )
    assert [(str(e.ip), e.ready, e.pod) for e in endpoints_from_slices([beta])] == [
        ("10.244.1.5", True, "shop/web-7d9f-a1b2c"),
        ("10.244.2.7", False, ""),
    ]


def test_an_endpoint_in_two_slices_gets_the_ports_of_both_in_a_stable_order() -> None:
    http = api_slice("web-a", "web", [slice_endpoint("10.244.1.5", "w", "n")], WEB_PORTS[:1])
    metrics = api_slice("web-b", "web", [slice_endpoint("10.244.1.5", "w", "n")], WEB_PORTS[1:])
    endpoints = endpoints_from_slices([metrics, http])
    assert endpoints == endpoints_from_slices([http, metrics])
    assert endpoints == (
        Endpoint(IPv4Address("10.244.1.5"), {"http": 8080, "metrics": 9091}, True, "shop/w"),
    )


def test_a_slice_port_without_a_number_and_extra_addresses_mean_nothing() -> None:
    obj = api_slice(
        "any-1",
        "any",
        [{"addresses": ["10.244.1.5", "10.244.1.6"], "conditions": {"ready": True}}],
        [{"name": "all", "protocol": "TCP", "port": None}, {"name": "http", "port": 80}],
    )
    errors: list[str] = []
    assert endpoints_from_slices([obj], errors=errors) == (
        Endpoint(IPv4Address("10.244.1.5"), {"http": 80}),
    )
    assert errors == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"addressType": "IPv5"}, "endpointslice shop/web-abc12: addressType: 'IPv5' is not"),
        (
            {"endpoints": [{"addresses": []}]},
            "endpointslice shop/web-abc12: endpoints[0].addresses",
        ),
        (
            {"endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": "yes"}}]},
            "endpointslice shop/web-abc12: endpoints[0].conditions.ready: 'yes' is not",
        ),
        (
            {"ports": [{"name": "http", "port": 0}]},
            "endpointslice shop/web-abc12: ports[0].port: 0",
        ),
    ],
)
def test_a_malformed_part_of_a_slice_is_named(change: dict[str, Any], message: str) -> None:
    obj = copy.deepcopy(WEB_SLICE) | change
    errors: list[str] = []
    endpoints_from_slices([obj], errors=errors)
    assert errors
    assert errors[0].startswith(message)


# --- joining -------------------------------------------------------------------------------


def test_services_are_joined_with_their_endpoints_slices_winning() -> None:
    stale = copy.deepcopy(WEB_ENDPOINTS)
    stale["subsets"][0]["addresses"] = [{"ip": "10.244.9.9"}]
    other_namespace = api_slice("web-zz", "web", [slice_endpoint("10.244.8.8", "x", "n")], [])
    other_namespace["metadata"]["namespace"] = "staging"
    unlabelled = copy.deepcopy(WEB_SLICE)
    del unlabelled["metadata"]["labels"]["kubernetes.io/service-name"]
    unlabelled["endpoints"] = [slice_endpoint("10.244.7.7", "y", "n")]
    parsed = services_from_objects(
        [WEB, FRONT, DB, UPSTREAM, LEGACY],
        [stale, LEGACY_ENDPOINTS],
        [WEB_SLICE, WEB_SLICE_V6, other_namespace, unlabelled],
    )
    assert isinstance(parsed, ServiceParse)
    services, errors = parsed
    assert errors == []
    assert [s.key for s in services] == ["shop/db", "shop/front", "shop/legacy", "shop/web"]
    by_key = {s.key: s for s in services}
    assert [str(e.ip) for e in by_key["shop/web"].endpoints] == [
        "10.244.1.5",
        "10.244.2.7",
        "10.244.2.9",
    ]
    assert [str(e.ip) for e in by_key["shop/legacy"].endpoints] == ["192.168.10.5"]
    assert by_key["shop/front"].endpoints == ()
    assert by_key["shop/db"].cluster_ip is None


def test_without_slices_the_endpoints_object_is_used() -> None:
    services, errors = services_from_objects([WEB], [WEB_ENDPOINTS], [])
    assert errors == []
    assert len(services[0].endpoints) == 4


def test_joined_services_become_frontends_with_resolved_named_ports() -> None:
    services, _ = services_from_objects([WEB, LEGACY], [LEGACY_ENDPOINTS], [WEB_SLICE])
    found, problems = frontends(services, pod_cidrs=[IPv4Network("10.244.0.0/16")])
    http = next(f for f in found if f.service == "shop/web" and f.port == 80)
    assert http.backends == (
        Backend(IPv4Address("10.244.1.5"), 8080, "shop/web-7d9f-a1b2c"),
        Backend(IPv4Address("10.244.2.9"), 8080, "shop/web-7d9f-d3e4f"),
    )
    legacy = next(f for f in found if f.service == "shop/legacy")
    assert legacy.backends == (Backend(IPv4Address("192.168.10.5"), 5432),)
    assert [p.service for p in problems] == ["shop/legacy"]  # outside the pod CIDR


def test_one_bad_object_leaves_the_others_intact() -> None:
    broken = copy.deepcopy(FRONT)
    broken["spec"]["type"] = 42
    services, errors = services_from_objects([broken, "junk", WEB], [None], [7, WEB_SLICE])
    assert [s.key for s in services] == ["shop/web"]
    assert len(services[0].endpoints) == 3
    assert errors == [
        "service shop/front: spec.type: 42 is not a Service type; the Service is skipped",
        "service (no name): (object): 'junk' is not a JSON object; it is skipped",
        "endpoints (no name): metadata.name: missing; it is skipped",
    ]


def test_a_service_listed_twice_is_used_once() -> None:
    services, errors = services_from_objects([WEB, WEB], [], [])
    assert len(services) == 1
    assert errors == ["service shop/web: listed twice; the first one is used"]


# --- fuzzing -------------------------------------------------------------------------------

FUZZ = settings(
    derandomize=True,
    database=None,  # nothing written into the checkout; derandomized runs repeat anyway
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEYS = st.one_of(
    st.sampled_from(
        [
            "metadata", "name", "namespace", "labels", "kubernetes.io/service-name", "spec",
            "type", "clusterIP", "clusterIPs", "ports", "port", "targetPort", "protocol",
            "nodePort", "selector", "subsets", "addresses", "notReadyAddresses", "ip",
            "targetRef", "kind", "addressType", "endpoints", "conditions", "ready",
        ]
    ),
    st.text(max_size=6),
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "None", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "TCP", "UDP",
            "IPv4", "IPv6", "FQDN", "Pod", "10.96.0.1", "10.244.1.5", "fd00::1", "127.0.0.1",
            "0.0.0.0", "10.0.0.256", "http", "shop", "web", "\ud800",
        ]
    ),
    st.sampled_from([0, 1, 80, 65535, 65536]),
    # Too long for str(): a message that shows it must not.
    st.integers(5000, 5001).map(lambda digits: 10**digits),
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=12,
)
OBJECTS = st.one_of(JSON, st.dictionaries(KEYS, JSON, max_size=6))
FIXTURES = [WEB, FRONT, DB, UPSTREAM, LEGACY, LEGACY_ENDPOINTS, WEB_ENDPOINTS, WEB_SLICE]


def assert_well_typed_errors(errors: list[str]) -> None:
    """Every message is a string, and none is the last-resort catch of an exception (that
    would be a check that raised instead of refusing: a bug, contained)."""
    assert all(isinstance(e, str) for e in errors)
    raised = [e for e in errors if "could not be read" in e]
    assert not raised, raised


def assert_endpoints(endpoints: object) -> None:
    assert isinstance(endpoints, tuple)
    for endpoint in endpoints:
        assert isinstance(endpoint, Endpoint)
        assert isinstance(endpoint.ip, IPv4Address)
        assert isinstance(endpoint.ready, bool)
        assert isinstance(endpoint.pod, str)
        assert all(
            isinstance(k, str) and type(v) is int and 1 <= v <= 65535
            for k, v in endpoint.ports.items()
        )


def assert_service(service: object) -> None:
    assert isinstance(service, Service)
    assert service.cluster_ip is None or isinstance(service.cluster_ip, IPv4Address)
    assert isinstance(service.type, ServiceType)
    for port in service.ports:
        assert type(port.port) is int and 1 <= port.port <= 65535
        assert isinstance(port.target, int | str)
        assert port.node_port is None or 1 <= port.node_port <= 65535
    assert_endpoints(service.endpoints)


def lookup(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += paths_of(child, (*prefix, index))
    return out


@st.composite
def mutated_fixture(draw: st.DrawFn) -> Any:
    """A realistic object with one value anywhere in it replaced by anything: closer to what
    reaches the converters than random JSON, which rarely gets past `metadata`."""
    document = copy.deepcopy(draw(st.sampled_from(FIXTURES)))
    path = draw(st.sampled_from(paths_of(document)))
    if not path:
        return draw(OBJECTS)
    lookup(document, path[:-1])[path[-1]] = draw(JSON)
    return document


ANY_OBJECT = st.one_of(OBJECTS, mutated_fixture())


@FUZZ
@given(ANY_OBJECT)
def test_service_from_object_never_raises(obj: Any) -> None:
    errors: list[str] = []
    service = service_from_object(obj, errors=errors)
    if service is not None:
        assert_service(service)
        assert service.endpoints == ()
    assert_well_typed_errors(errors)


@FUZZ
@given(ANY_OBJECT)
def test_endpoints_from_endpoints_object_never_raises(obj: Any) -> None:
    errors: list[str] = []
    assert_endpoints(endpoints_from_endpoints_object(obj, errors=errors))
    assert_well_typed_errors(errors)


@FUZZ
@given(st.lists(ANY_OBJECT, max_size=3))
def test_endpoints_from_slices_never_raises(slices: list[Any]) -> None:
    errors: list[str] = []
    assert_endpoints(endpoints_from_slices(slices, errors=errors))
    assert_well_typed_errors(errors)


@FUZZ
@given(
    st.lists(ANY_OBJECT, max_size=3),
    st.lists(ANY_OBJECT, max_size=3),
    st.lists(ANY_OBJECT, max_size=3),
)
def test_services_from_objects_never_raises(
    services: list[Any], endpoints: list[Any], slices: list[Any]
) -> None:
    parsed = services_from_objects(services, endpoints, slices)
    assert isinstance(parsed, ServiceParse)
    assert isinstance(parsed.services, list)
    for service in parsed.services:
        assert_service(service)
    assert len({s.key for s in parsed.services}) == len(parsed.services)
    assert_well_typed_errors(parsed.errors)
    frontends(parsed.services, node_ips=[IPv4Address("192.168.1.10")])
