"""Services, Endpoints and EndpointSlices (raw JSON, as the API server sends them) to steer's
Service model. Pure.

In a cluster, a Service's endpoints always come from its Endpoints or EndpointSlice objects,
never from pods: the endpoints controllers write them for Services with a selector too, and
only they have resolved each named targetPort against each pod's own container ports.

Nothing here raises on a malformed object. The bad part (a port, an address, or the whole
object where nothing of it is usable) is left out, and a message naming the object and the
field is added to the caller's `errors`: one bad object must never stop the control plane
that read it, nor hide the Services that are fine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from ipaddress import IPv4Address, ip_address
from typing import Any, NamedTuple, TypeGuard

from steer.model.service import PROTOCOLS, Endpoint, Service, ServicePort, ServiceType

Object = Mapping[str, Any]
# Kubernetes' own label (not steer's): it names the Service an EndpointSlice belongs to.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEADLESS = "None"
_SERVICE_TYPES = {t.value: t for t in ServiceType}
# Address families steer does not balance: their slices are left out without a message.
_OTHER_ADDRESS_TYPES = frozenset({"IPv6", "FQDN"})
ENDPOINT_SLICES = "endpointslices"
log = logging.getLogger("steer.source")


def _part(*path: str) -> Callable[[Mapping[str, Any]], object]:
    def read(obj: Mapping[str, Any]) -> object:
        value: Any = obj
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    return read


# What is read of these kinds (here, and the agent's pod_cidrs): anything else changing
# (status heartbeats, leader-election annotations renewed every 2 s) triggers no render.
RELEVANT: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "services": _part("spec"),
    "endpoints": _part("subsets"),
    ENDPOINT_SLICES: lambda o: (
        _part("metadata", "labels")(o),
        o.get("addressType"),
        o.get("endpoints"),
        o.get("ports"),
    ),
    "nodes": lambda o: (_part("spec", "podCIDR")(o), _part("spec", "podCIDRs")(o)),
}


def service_sources(api_client: Any) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """The list calls of the kinds `services_from_objects` reads, by reflector name."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    return {
        "services": (core.list_service_for_all_namespaces, {}),
        "endpoints": (core.list_endpoints_for_all_namespaces, {}),
        ENDPOINT_SLICES: (
            client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
            {},
        ),
    }


def serves_endpoint_slices(api_client: Any) -> bool:
    """Whether the API server serves discovery.k8s.io/v1 (Kubernetes 1.21 and later);
    without it the Endpoints objects give the Services' endpoints."""
    from kubernetes import client

    try:
        groups = client.ApisApi(api_client).get_api_versions().groups or []
    except Exception as exc:  # the API is away: Endpoints work everywhere
        log.warning("API discovery failed (%s); reading Services' Endpoints", exc)
        return False
    return any(
        g.name == "discovery.k8s.io" and any(v.version == "v1" for v in g.versions or ())
        for g in groups
    )


def services_of(objects: Mapping[str, list[Any]]) -> ServiceParse:
    """`services_from_objects` over reflector snapshots by the names above."""
    return services_from_objects(
        objects.get("services", []),
        objects.get("endpoints", []),
        objects.get(ENDPOINT_SLICES, []),
    )


class ServiceParse(NamedTuple):
    """Every Service that has a frontend steer can translate, with its endpoints, sorted by
    namespace/name; and one message per part of an object that was left out."""

    services: list[Service]
    errors: list[str]


def service_from_object(obj: Object, *, errors: list[str] | None = None) -> Service | None:
    """The Service, without endpoints (see `services_from_objects`), or None where there is
    no IPv4 address to translate: an ExternalName Service, an IPv6 single-stack one, or one
    too malformed to use. A headless Service is returned, with `cluster_ip` None."""
    sink = [] if errors is None else errors
    try:
        return _service(obj, sink)
    except Exception as exc:  # every field is checked; this is the last stop
        sink.append(_unreadable("service", obj, exc))
        return None


def endpoints_from_endpoints_object(
    obj: Object, *, errors: list[str] | None = None
) -> tuple[Endpoint, ...]:
    """A core/v1 Endpoints object's IPv4 endpoints: `addresses` ready, `notReadyAddresses`
    not. An address listed in several subsets is one endpoint with the ports of them all."""
    sink = [] if errors is None else errors
    try:
        return _endpoints(obj, sink)
    except Exception as exc:  # every field is checked; this is the last stop
        sink.append(_unreadable("endpoints", obj, exc))
        return ()


def endpoints_from_slices(
    slices: Iterable[Object], *, errors: list[str] | None = None
) -> tuple[Endpoint, ...]:
    """The IPv4 endpoints of one Service's EndpointSlices (discovery.k8s.io/v1 or v1beta1;
    the caller groups them by the `kubernetes.io/service-name` label). An endpoint whose
    readiness is unknown counts as ready, as the API asks consumers to take it."""
    sink = [] if errors is None else errors
    merged: _Merged = {}
    for obj in slices:
        try:
            _read_slice(obj, merged, sink)
        except Exception as exc:  # every field is checked; this is the last stop
            sink.append(_unreadable("endpointslice", obj, exc))
    return _endpoint_tuple(merged)


def services_from_objects(
    services: Iterable[Object],
    endpoints_objects: Iterable[Object],
    slices: Iterable[Object],
) -> ServiceParse:
    """Services joined with their endpoints by namespace/name. Where any EndpointSlice names
    a Service, its slices alone give its endpoints (they are what kube-proxy reads, and the
    mirroring controller copies hand-written Endpoints into them); otherwise its Endpoints
    object does. Endpoints and slices of no listed Service are not parsed."""
    errors: list[str] = []
    parsed: dict[str, Service] = {}
    for obj in services:
        service = service_from_object(obj, errors=errors)
        if service is None:
            continue
        if service.key in parsed:
            errors.append(f"service {service.key}: listed twice; the first one is used")
            continue
        parsed[service.key] = service
    by_name: dict[str, Object] = {}
    for obj in endpoints_objects:
        key = _key(obj)
        if key is None:
            errors.append(f"{_label('endpoints', obj)}: metadata.name: missing; it is skipped")
        elif key in parsed:
            by_name.setdefault(key, obj)
    slices_of: dict[str, list[Object]] = {}
    for obj in slices:
        key = _slice_service(obj)
        if key is not None and key in parsed:
            slices_of.setdefault(key, []).append(obj)
    found = []
    for key in sorted(parsed):
        if key in slices_of:
            endpoints = endpoints_from_slices(slices_of[key], errors=errors)
        elif key in by_name:
            endpoints = endpoints_from_endpoints_object(by_name[key], errors=errors)
        else:
            endpoints = ()
        found.append(replace(parsed[key], endpoints=endpoints))
    return ServiceParse(found, errors)


# --- object identity and messages ----------------------------------------------------------


def _metadata(obj: object) -> Mapping[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def _namespace(obj: object) -> str:
    namespace = _metadata(obj).get("namespace")
    return namespace if isinstance(namespace, str) and namespace else "default"


def _key(obj: object) -> str | None:
    name = _metadata(obj).get("name")
    if not isinstance(name, str) or not name:
        return None
    return f"{_namespace(obj)}/{name}"


def _label(kind: str, obj: object) -> str:
    return f"{kind} {_key(obj) or '(no name)'}"


def _slice_service(obj: object) -> str | None:
    labels = _metadata(obj).get("labels")
    name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
    # A slice without the label is someone else's (a controller of its own): not an error.
    return f"{_namespace(obj)}/{name}" if isinstance(name, str) and name else None


def _unreadable(kind: str, obj: object, exc: Exception) -> str:
    return f"{_label(kind, obj)}: could not be read ({type(exc).__name__}); it is skipped"


def _show(value: object) -> str:
    # Only scalars are shown: str() of a hostile value (nested thousands deep, or an integer
    # of thousands of digits) raises, and a long one would flood the log.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**15 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 64 else repr(value[:64]) + "..."
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


class _Report:
    """Messages about one object, each naming it and the field."""

    def __init__(self, label: str, errors: list[str]) -> None:
        self.label = label
        self.errors = errors

    def add(self, path: str, message: str) -> None:
        self.errors.append(f"{self.label}: {path}: {message}")


def _is_port(value: object) -> TypeGuard[int]:
    return type(value) is int and 1 <= value <= 65535


def _list(value: object) -> list[Any] | tuple[Any, ...] | None:
    return value if isinstance(value, list | tuple) else None


# --- Services ------------------------------------------------------------------------------


def _service(obj: object, errors: list[str]) -> Service | None:
    report = _Report(_label("service", obj), errors)
    if not isinstance(obj, Mapping):
        report.add("(object)", f"{_show(obj)} is not a JSON object; it is skipped")
        return None
    key = _key(obj)
    if key is None:
        report.add("metadata.name", "missing; the Service is skipped")
        return None
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        report.add("spec", f"{_show(spec)} is not an object; the Service is skipped")
        return None
    kind = spec.get("type")
    if kind is None:
        kind = ServiceType.CLUSTER_IP.value  # the API server's default
    if kind == "ExternalName":
        return None  # a DNS alias: no address of its own to translate
    service_type = _SERVICE_TYPES.get(kind) if isinstance(kind, str) else None
    if service_type is None:
        report.add("spec.type", f"{_show(kind)} is not a Service type; the Service is skipped")
        return None
    has_frontend, cluster_ip = _cluster_ip(spec, report)
    if not has_frontend:
        return None
    return Service(
        namespace=_namespace(obj),
        name=obj["metadata"]["name"],
        cluster_ip=cluster_ip,
        ports=_service_ports(spec.get("ports"), report),
        selector=_selector(spec.get("selector"), report),
        type=service_type,
    )


def _cluster_ip(spec: Mapping[str, Any], report: _Report) -> tuple[bool, IPv4Address | None]:
    """(whether the Service has an address to translate, or is headless; its IPv4 address).
    `clusterIPs` lists both families of a dual-stack Service, primary first; `clusterIP` is
    only the primary, which may be the IPv6 one."""
    ips = spec.get("clusterIPs")
    candidates: list[tuple[str, object]]
    if isinstance(ips, list | tuple) and ips:
        candidates = [(f"spec.clusterIPs[{i}]", value) for i, value in enumerate(ips)]
    else:
        if ips is not None and not isinstance(ips, list | tuple):
            report.add("spec.clusterIPs", f"{_show(ips)} is not a list; spec.clusterIP is used")
        candidates = [("spec.clusterIP", spec.get("clusterIP"))]
    for path, value in candidates:
        if value == HEADLESS:
            return True, None
        if not isinstance(value, str) or not value:
            # The API server allocates it before it stores the Service: never missing there.
            report.add(path, f"{_show(value)} is not an IP address")
            continue
        try:
            return True, IPv4Address(value)
        except ValueError:
            pass
        try:
            ip_address(value)
        except ValueError:
            report.add(path, f"{_show(value)} is not an IP address")
        # else: an IPv6 address, which steer does not translate; not the object's fault.
    return False, None


def _service_ports(raw: object, report: _Report) -> tuple[ServicePort, ...]:
    if raw is None:
        return ()  # a headless Service may have no ports
    items = _list(raw)
    if items is None:
        report.add("spec.ports", f"{_show(raw)} is not a list; the Service has no ports")
        return ()
    ports = (_service_port(item, f"spec.ports[{i}]", report) for i, item in enumerate(items))
    return tuple(p for p in ports if p is not None)


def _service_port(item: object, at: str, report: _Report) -> ServicePort | None:
    if not isinstance(item, Mapping):
        report.add(at, f"{_show(item)} is not an object; the port is skipped")
        return None
    port = item.get("port")
    if not _is_port(port):
        report.add(f"{at}.port", f"{_show(port)} is not a port number")
        return None
    name = item.get("name")
    if name is None:
        name = ""
    if not isinstance(name, str):
        # Endpoints are matched to a Service port by name: a port without one cannot match.
        report.add(f"{at}.name", f"{_show(name)} is not a string; the port is skipped")
        return None
    protocol = item.get("protocol")
    if protocol is None:
        protocol = "TCP"
    if protocol not in PROTOCOLS:
        report.add(f"{at}.protocol", f"{_show(protocol)} is not one of {', '.join(PROTOCOLS)}")
        return None
    target = item.get("targetPort")
    if target is None:
        target = port  # the API server's default
    if not (_is_port(target) or (isinstance(target, str) and target)):
        report.add(f"{at}.targetPort", f"{_show(target)} is neither a port number nor a name")
        return None
    node_port = item.get("nodePort")
    if node_port is not None and not _is_port(node_port):
        # The ClusterIP port works without it: keep the port, drop only the node port.
        report.add(f"{at}.nodePort", f"{_show(node_port)} is not a port number; it is ignored")
        node_port = None
    return ServicePort(port, target, name, protocol, node_port)


def _selector(raw: object, report: _Report) -> Mapping[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        report.add("spec.selector", f"{_show(raw)} is not an object; it is ignored")
        return None
    selector = {}
    for key, value in raw.items():
        if isinstance(key, str) and isinstance(value, str):
            selector[key] = value
        else:
            report.add(f"spec.selector[{_show(key)}]", f"{_show(value)} is not a string")
    # An empty selector selects nothing for a Service: its endpoints are written by hand.
    return selector or None


# --- Endpoints and EndpointSlices ----------------------------------------------------------

# (address, ready) -> (port name -> number, pod)
_Merged = dict[tuple[IPv4Address, bool], tuple[dict[str, int], str]]
_SPECIAL: tuple[tuple[str, Callable[[IPv4Address], bool]], ...] = (
    ("the unspecified address", lambda ip: ip.is_unspecified),
    ("a loopback address", lambda ip: ip.is_loopback),
    ("a link-local address", lambda ip: ip.is_link_local),
    ("a multicast address", lambda ip: ip.is_multicast),
)


def _merge(
    merged: _Merged, ip: IPv4Address, ready: bool, ports: Mapping[str, int], pod: str
) -> None:
    # The first number seen for a name wins: an address listed twice with different numbers
    # for one name is malformed, and either would do.
    known, known_pod = merged.get((ip, ready), ({}, ""))
    merged[ip, ready] = ({**ports, **known}, known_pod or pod)


def _endpoint_tuple(merged: _Merged) -> tuple[Endpoint, ...]:
    # Sorted, so a relisting in another order renders to the same snapshot version.
    found = []
    for ip, ready in sorted(merged, key=lambda key: (key[0], not key[1])):
        ports, pod = merged[ip, ready]
        found.append(Endpoint(ip, ports, ready, pod))
    return tuple(found)


def _endpoint_ip(value: object, at: str, report: _Report) -> IPv4Address | None:
    if not isinstance(value, str):
        report.add(at, f"{_show(value)} is not an IP address; the address is skipped")
        return None
    try:
        ip = IPv4Address(value)
    except ValueError:
        try:
            ip_address(value)
        except ValueError:
            report.add(at, f"{_show(value)} is not an IP address; the address is skipped")
        return None  # an IPv6 address: steer balances IPv4 only
    # The API server refuses these as endpoints too. Balanced to, a loopback address would
    # be the client pod's own, and a link-local one the node's (a cloud's metadata server).
    special = next((kind for kind, test in _SPECIAL if test(ip)), "")
    if special:
        report.add(at, f"{ip} is {special}, never an endpoint; it is skipped")
        return None
    return ip


def _pod_of(ref: object, namespace: str, at: str, report: _Report) -> str:
    if ref is None:
        return ""  # hand-written endpoints often point at no object
    if not isinstance(ref, Mapping):
        report.add(at, f"{_show(ref)} is not an object; it is ignored")
        return ""
    name = ref.get("name")
    if ref.get("kind") != "Pod" or not isinstance(name, str) or not name:
        return ""
    pod_namespace = ref.get("namespace")
    if isinstance(pod_namespace, str) and pod_namespace:
        namespace = pod_namespace
    return f"{namespace}/{name}"


def _port_map(raw: object, at: str, report: _Report, *, port_required: bool) -> dict[str, int]:
    """Port name -> number, of every protocol: a Service port finds its own by name."""
    if raw is None:
        return {}
    items = _list(raw)
    if items is None:
        report.add(at, f"{_show(raw)} is not a list; the ports are ignored")
        return {}
    ports: dict[str, int] = {}
    for i, item in enumerate(items):
        here = f"{at}[{i}]"
        if not isinstance(item, Mapping):
            report.add(here, f"{_show(item)} is not an object; the port is skipped")
            continue
        name, number = item.get("name"), item.get("port")
        if name is None:
            name = ""
        if not isinstance(name, str):
            report.add(f"{here}.name", f"{_show(name)} is not a string; the port is skipped")
            continue
        if number is None and not port_required:
            continue  # a slice's "every port": nothing a Service port can be translated to
        if not _is_port(number):
            report.add(f"{here}.port", f"{_show(number)} is not a port number")
            continue
        ports.setdefault(name, number)
    return ports


def _endpoints(obj: object, errors: list[str]) -> tuple[Endpoint, ...]:
    report = _Report(_label("endpoints", obj), errors)
    if not isinstance(obj, Mapping):
        report.add("(object)", f"{_show(obj)} is not a JSON object; it is skipped")
        return ()
    namespace = _namespace(obj)
    raw = obj.get("subsets")
    if raw is None:
        return ()  # no endpoints at all: the API server leaves subsets out
    subsets = _list(raw)
    if subsets is None:
        report.add("subsets", f"{_show(raw)} is not a list; it is ignored")
        return ()
    merged: _Merged = {}
    for i, subset in enumerate(subsets):
        at = f"subsets[{i}]"
        if not isinstance(subset, Mapping):
            report.add(at, f"{_show(subset)} is not an object; the subset is skipped")
            continue
        ports = _port_map(subset.get("ports"), f"{at}.ports", report, port_required=True)
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            raw_addresses = subset.get(field)
            if raw_addresses is None:
                continue
            addresses = _list(raw_addresses)
            if addresses is None:
                report.add(f"{at}.{field}", f"{_show(raw_addresses)} is not a list")
                continue
            for j, address in enumerate(addresses):
                here = f"{at}.{field}[{j}]"
                if not isinstance(address, Mapping):
                    report.add(here, f"{_show(address)} is not an object; it is skipped")
                    continue
                ip = _endpoint_ip(address.get("ip"), f"{here}.ip", report)
                if ip is None:
                    continue
                pod = _pod_of(address.get("targetRef"), namespace, f"{here}.targetRef", report)
                _merge(merged, ip, ready, ports, pod)
    return _endpoint_tuple(merged)


def _read_slice(obj: object, merged: _Merged, errors: list[str]) -> None:
    report = _Report(_label("endpointslice", obj), errors)
    if not isinstance(obj, Mapping):
        report.add("(object)", f"{_show(obj)} is not a JSON object; it is skipped")
        return
    address_type = obj.get("addressType")
    if isinstance(address_type, str) and address_type in _OTHER_ADDRESS_TYPES:
        return
    if address_type != "IPv4":
        report.add("addressType", f"{_show(address_type)} is not IPv4, IPv6 or FQDN")
        return
    namespace = _namespace(obj)
    ports = _port_map(obj.get("ports"), "ports", report, port_required=False)
    raw = obj.get("endpoints")
    if raw is None:
        return
    endpoints = _list(raw)
    if endpoints is None:
        report.add("endpoints", f"{_show(raw)} is not a list; it is ignored")
        return
    for j, endpoint in enumerate(endpoints):
        at = f"endpoints[{j}]"
        if not isinstance(endpoint, Mapping):
            report.add(at, f"{_show(endpoint)} is not an object; it is skipped")
            continue
        addresses = _list(endpoint.get("addresses"))
        if not addresses:
            report.add(f"{at}.addresses", "missing or empty; the endpoint is skipped")
            continue
        # Only the first address means anything: "No semantics are defined for additional
        # addresses beyond the first, and kube-proxy does not look at them" (the API).
        ip = _endpoint_ip(addresses[0], f"{at}.addresses[0]", report)
        if ip is None:
            continue
        conditions = endpoint.get("conditions")
        if conditions is None:
            conditions = {}
        if not isinstance(conditions, Mapping):
            report.add(f"{at}.conditions", f"{_show(conditions)} is not an object; skipped")
            continue
        ready = conditions.get("ready")
        if ready is None:
            ready = True  # unknown; the API asks consumers to take it as ready
        if not isinstance(ready, bool):
            report.add(f"{at}.conditions.ready", f"{_show(ready)} is not a boolean; skipped")
            continue
        pod = _pod_of(endpoint.get("targetRef"), namespace, f"{at}.targetRef", report)
        _merge(merged, ip, ready, ports, pod)
