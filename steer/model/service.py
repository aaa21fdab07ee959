"""Services as steer sees them: addresses a pod can dial that stand for a set of backends.

Pure. A `Service` carries its ports and its endpoints as Kubernetes gives them (Endpoints
or EndpointSlices, whose ports are already resolved by name); the local lab plays the
endpoints controller with `endpoints_from_pods`. `frontends` turns Services into what
the datapath balances over: one `Frontend` per (address, port) a client can dial, with
the ready backends behind it, and a `ServiceProblem` for everything that makes a Service
behave other than its author likely meant. A problem never drops a Service silently:
a Service with no ready backend still gets its frontend, and connects to it are refused,
as kube-proxy refuses them.

Verdicts are never decided here: the datapath chooses a backend first and then decides
the flow exactly as it decides a flow dialled to that backend directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

from steer.constants import ENVOY_INBOUND_PORT, ENVOY_OUTBOUND_PORT

# Backends per frontend that connect4 can choose from (the map's slot index is a u16,
# and slot 0 is the frontend itself).
MAX_BACKENDS = 4096
PROTOCOLS = ("TCP", "UDP", "SCTP")


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    # A LoadBalancer Service is a NodePort Service with an external address on top; the
    # node sees its ClusterIP and node ports.
    LOAD_BALANCER = "LoadBalancer"


@dataclass(frozen=True)
class ServicePort:
    port: int
    # A number, or the name of a container port that each endpoint resolves for itself.
    target: int | str
    name: str = ""
    protocol: str = "TCP"
    node_port: int | None = None


@dataclass(frozen=True)
class Endpoint:
    ip: IPv4Address
    # Port name -> number, as the endpoints controller resolved them ("" for an unnamed
    # port).
    ports: Mapping[str, int]
    ready: bool = True
    # The pod behind the endpoint, if any ("namespace/name"): for status only.
    pod: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    def __hash__(self) -> int:
        return hash((self.ip, tuple(sorted(self.ports.items())), self.ready, self.pod))


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    # None: a headless Service (clusterIP: None), which has no address to translate.
    cluster_ip: IPv4Address | None
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    # None: a Service without a selector, whose endpoints someone wrote by hand.
    selector: Mapping[str, str] | None = field(default=None, hash=False, compare=True)
    type: ServiceType = ServiceType.CLUSTER_IP

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Backend:
    ip: IPv4Address
    port: int
    pod: str = ""


@dataclass(frozen=True)
class Frontend:
    """One address and port a client dials, and the backends a connect to it may get."""

    ip: IPv4Address
    port: int
    service: str  # namespace/name
    port_name: str
    backends: tuple[Backend, ...]
    node_port: bool = False

    @property
    def label(self) -> str:
        """ "namespace/name address:port": how status and logs name the frontend."""
        return f"{self.service} {self.ip}:{self.port}"


class Problem(StrEnum):
    NO_READY_ENDPOINTS = "NoReadyEndpoints"
    PORT_ON_NO_ENDPOINT = "PortOnNoEndpoint"
    ENDPOINT_OUTSIDE_POD_CIDR = "EndpointOutsidePodCIDR"
    TOO_MANY_BACKENDS = "TooManyBackends"
    ENDPOINT_ON_ENVOY_PORT = "EndpointOnEnvoyPort"
    PROTOCOL_NOT_STEERED = "ProtocolNotSteered"
    # The datapath could not hold the Service (a full map): kube-proxy serves it.
    MAP_FULL = "MapFull"


@dataclass(frozen=True)
class ServiceProblem:
    service: str
    problem: Problem
    message: str


def _resolved_port(endpoint: Endpoint, port: ServicePort) -> int | None:
    """The endpoint's number for the Service port: by the port's name, as Endpoints and
    EndpointSlices carry it; a single unnamed port may be listed under ""."""
    if port.name in endpoint.ports:
        return endpoint.ports[port.name]
    return None


def frontends(
    services: Iterable[Service],
    pod_cidrs: Sequence[IPv4Network] = (),
    node_ips: Sequence[IPv4Address] = (),
) -> tuple[list[Frontend], list[ServiceProblem]]:
    """Every frontend of `services` (ClusterIP ports, and NodePorts on `node_ips`), in a
    stable order, and every problem found. `pod_cidrs`: where pods live; an endpoint
    outside them is used, but reported (it is not a pod, so no ingress policy of steer's
    protects it)."""
    found: list[Frontend] = []
    problems: list[ServiceProblem] = []
    for service in sorted(services, key=lambda s: s.key):
        for port in service.ports:
            if port.protocol != "TCP":
                problems.append(
                    ServiceProblem(
                        service.key,
                        Problem.PROTOCOL_NOT_STEERED,
                        f"port {port.name or port.port}/{port.protocol}: only TCP is "
                        "balanced at connect time; kube-proxy serves this port",
                    )
                )
                continue
            backends, port_problems = _backends(service, port, pod_cidrs)
            problems += port_problems
            if service.cluster_ip is not None:
                found.append(
                    Frontend(service.cluster_ip, port.port, service.key, port.name, backends)
                )
            if port.node_port is not None and service.type is not ServiceType.CLUSTER_IP:
                found += [
                    Frontend(ip, port.node_port, service.key, port.name, backends, node_port=True)
                    for ip in node_ips
                ]
    return found, problems


def _backends(
    service: Service, port: ServicePort, pod_cidrs: Sequence[IPv4Network]
) -> tuple[tuple[Backend, ...], list[ServiceProblem]]:
    problems: list[ServiceProblem] = []
    label = f"port {port.name or port.port}"
    ready = [e for e in service.endpoints if e.ready]
    if not ready:
        waiting = len(service.endpoints)
        problems.append(
            ServiceProblem(
                service.key,
                Problem.NO_READY_ENDPOINTS,
                f"{label}: no ready endpoint"
                + (f" ({waiting} not ready)" if waiting else "")
                + "; connects to it are refused. Fix: check the selector "
                f"{dict(service.selector or {})} matches running, ready pods",
            )
        )
        return (), problems
    backends = []
    for endpoint in ready:
        number = _resolved_port(endpoint, port)
        if number is None:
            continue
        if number in (ENVOY_OUTBOUND_PORT, ENVOY_INBOUND_PORT):
            # Balanced to Envoy's own listener, a flow would make Envoy proxy to itself.
            problems.append(
                ServiceProblem(
                    service.key,
                    Problem.ENDPOINT_ON_ENVOY_PORT,
                    f"{label}: endpoint {endpoint.ip}:{number} is a port of steer's Envoy; "
                    "it is left out. Fix: point the Service at the workload's own port",
                )
            )
            continue
        backends.append(Backend(endpoint.ip, number, endpoint.pod))
        if pod_cidrs and not any(endpoint.ip in cidr for cidr in pod_cidrs):
            problems.append(
                ServiceProblem(
                    service.key,
                    Problem.ENDPOINT_OUTSIDE_POD_CIDR,
                    f"{label}: endpoint {endpoint.ip} is outside the pod CIDR "
                    f"({', '.join(map(str, pod_cidrs))}): it is balanced to, but only the "
                    "client's egress policy applies to it",
                )
            )
    if not backends:
        problems.append(
            ServiceProblem(
                service.key,
                Problem.PORT_ON_NO_ENDPOINT,
                f"{label}: no ready endpoint has a port named {port.name!r} "
                f"(target {port.target!r}); connects to it are refused. Fix: name the "
                "container port as the Service's targetPort does",
            )
        )
    # In address order, whatever order the endpoints came in: the same set of backends
    # is then the same frontend, and the map is not rewritten.
    backends.sort(key=lambda b: (b.ip, b.port))
    if len(backends) > MAX_BACKENDS:
        problems.append(
            ServiceProblem(
                service.key,
                Problem.TOO_MANY_BACKENDS,
                f"{label}: {len(backends)} backends, more than the {MAX_BACKENDS} one "
                "frontend can hold; the first ones by address are used",
            )
        )
        backends = backends[:MAX_BACKENDS]
    return tuple(backends), problems


@dataclass(frozen=True)
class PodPorts:
    """What the endpoints controller needs to know of a pod."""

    key: str  # namespace/name
    namespace: str
    ip: IPv4Address
    labels: Mapping[str, str]
    # Container port name -> number.
    named_ports: Mapping[str, int]
    ready: bool = True


def endpoints_from_pods(service: Service, pods: Iterable[PodPorts]) -> tuple[Endpoint, ...]:
    """The endpoints Kubernetes' endpoints controller would write for a Service with a
    selector: each pod of its namespace that the selector matches, with every Service port
    resolved for that pod (a numbered target as is, a named one through the pod's container
    ports; a pod lacking the name gets no entry for that port)."""
    if service.selector is None:
        return service.endpoints
    selector = service.selector
    found = []
    for pod in sorted(pods, key=lambda p: p.key):
        if pod.namespace != service.namespace:
            continue
        # An empty selector selects nothing for a Service (unlike a policy's podSelector).
        if not selector or any(pod.labels.get(k) != v for k, v in selector.items()):
            continue
        resolved = {}
        for port in service.ports:
            if isinstance(port.target, int):
                resolved[port.name] = port.target
            elif port.target in pod.named_ports:
                resolved[port.name] = pod.named_ports[port.target]
        found.append(Endpoint(pod.ip, resolved, pod.ready, pod.key))
    return tuple(found)
