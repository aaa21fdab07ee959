"""The local node's Services: declared in the lab file, given a ClusterIP by `steer lab up`,
recorded in the lab state, and turned into model Services by the lab acting as Kubernetes'
endpoints controller. Pure: no kernel here.

Lab file form (the Service's spec, flattened):

    services:
      - name: web
        namespace: default
        selector: {app: web}
        type: ClusterIP            # or NodePort
        clusterIP: 10.96.0.10     # optional; "None" makes it headless
        ports:
          - {name: http, port: 80, targetPort: http, protocol: TCP, nodePort: 30080}
      - name: legacy               # no selector: endpoints given by hand
        ports: [{port: 5432}]
        endpoints: [{ip: 10.244.0.9, ports: {"": 5432}}]
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict

from steer.constants import LAB_SERVICE_CIDR
from steer.model.service import (
    PROTOCOLS,
    Endpoint,
    PodPorts,
    Service,
    ServicePort,
    ServiceType,
    endpoints_from_pods,
)

# Kubernetes' own limits: a Service name is a DNS-1035 label; a port name an IANA service
# name; node ports come from the default --service-node-port-range.
# \Z, not $: `$` also matches before a trailing newline, and "web\n" is no name.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
NODE_PORT_RANGE = (30000, 32767)
HEADLESS = "None"
_SERVICE_FIELDS = {"name", "namespace", "selector", "type", "clusterIP", "ports", "endpoints"}
_PORT_FIELDS = {"name", "port", "targetPort", "protocol", "nodePort"}


class LabServiceError(ValueError):
    """A Service in a lab file that Kubernetes would refuse; the message names the field."""


class ServicePortJSON(TypedDict):
    name: str
    port: int
    target_port: int | str
    protocol: str
    node_port: int | None


class EndpointJSON(TypedDict):
    ip: str
    ports: dict[str, int]


class LabServiceJSON(TypedDict):
    name: str
    namespace: str
    type: str
    cluster_ip: str | None
    selector: dict[str, str] | None
    ports: list[ServicePortJSON]
    endpoints: list[EndpointJSON]


@dataclass(frozen=True)
class LabService:
    """A Service as the lab file declares it; `cluster_ip` is "" until `steer lab up`
    gives it one, and None for a headless Service."""

    name: str
    namespace: str
    ports: tuple[ServicePort, ...]
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ip: str | None = ""
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> LabServiceJSON:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "type": self.type.value,
            "cluster_ip": self.cluster_ip,
            "selector": dict(self.selector) if self.selector is not None else None,
            "ports": [
                {
                    "name": p.name,
                    "port": p.port,
                    "target_port": p.target,
                    "protocol": p.protocol,
                    "node_port": p.node_port,
                }
                for p in self.ports
            ],
            "endpoints": [{"ip": str(e.ip), "ports": dict(e.ports)} for e in self.endpoints],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabService:
        """What `to_json` wrote (the state file); raises ValueError, KeyError or TypeError
        on anything else."""
        selector = data.get("selector")
        return cls(
            name=str(data["name"]),
            namespace=str(data.get("namespace", "default")),
            type=ServiceType(data.get("type", ServiceType.CLUSTER_IP.value)),
            cluster_ip=data.get("cluster_ip"),
            selector=dict(selector) if selector is not None else None,
            ports=tuple(
                ServicePort(
                    port=int(p["port"]),
                    target=p["target_port"],
                    name=str(p.get("name", "")),
                    protocol=str(p.get("protocol", "TCP")),
                    node_port=p.get("node_port"),
                )
                for p in data["ports"]
            ),
            endpoints=tuple(
                Endpoint(ipaddress.IPv4Address(e["ip"]), dict(e["ports"]))
                for e in data.get("endpoints", [])
            ),
        )

    def model(self, pods: Iterable[PodPorts]) -> Service:
        """The Service with its endpoints, as Kubernetes' endpoints controller would list
        them for the lab's pods."""
        service = Service(
            namespace=self.namespace,
            name=self.name,
            cluster_ip=ipaddress.IPv4Address(self.cluster_ip) if self.cluster_ip else None,
            ports=self.ports,
            endpoints=self.endpoints,
            selector=self.selector,
            type=self.type,
        )
        # Without a selector, endpoints_from_pods hands back the endpoints given.
        return replace(service, endpoints=endpoints_from_pods(service, pods))


def _fail(where: str, message: str) -> LabServiceError:
    return LabServiceError(f"{where}: {message}")


def _port_number(value: object, where: str, low: int = 1, high: int = 65535) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"must be a number from {low} to {high}, got {value!r}")
    return value


def _string_map(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(where, "must map strings to strings")
    return dict(value)


def _parse_port(raw: object, where: str, service_type: ServiceType) -> ServicePort:
    if not isinstance(raw, Mapping):
        raise _fail(where, "each port must be a mapping with at least 'port'")
    unknown = set(raw) - _PORT_FIELDS
    if unknown:
        raise _fail(where, f"unknown field(s) {sorted(unknown)}; fix: remove them")
    port = _port_number(raw.get("port"), f"{where}.port")
    name = raw.get("name", "")
    if not isinstance(name, str) or (name and not _DNS1123.match(name)) or len(name) > 63:
        raise _fail(f"{where}.name", f"{name!r} is not a valid port name (DNS-1123 label)")
    target: object = raw.get("targetPort", port)
    if isinstance(target, str):
        if len(target) > 15 or not _IANA_SVC_NAME.match(target) or "--" in target:
            raise _fail(
                f"{where}.targetPort",
                f"{target!r} is neither a port number nor a container port name (up to 15 "
                "lowercase letters, digits and '-', with at least one letter)",
            )
    else:
        target = _port_number(target, f"{where}.targetPort")
    protocol = raw.get("protocol", "TCP")
    if protocol not in PROTOCOLS:
        raise _fail(f"{where}.protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    node_port = raw.get("nodePort")
    if node_port is not None:
        if service_type is ServiceType.CLUSTER_IP:
            raise _fail(
                f"{where}.nodePort", "only a NodePort Service has node ports; fix: set type"
            )
        node_port = _port_number(node_port, f"{where}.nodePort", *NODE_PORT_RANGE)
    return ServicePort(port, target, name, str(protocol), node_port)


def parse_lab_service(raw: object, where: str) -> LabService:
    """One entry of a lab file's `services:`. Raises LabServiceError naming the field."""
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise _fail(where, "each Service needs at least a 'name' and 'ports'")
    unknown = set(raw) - _SERVICE_FIELDS
    if unknown:
        raise _fail(where, f"unknown field(s) {sorted(unknown)}; fix: remove them")
    name, namespace = raw["name"], raw.get("namespace", "default")
    if not isinstance(name, str) or len(name) > 63 or not _DNS1035.match(name):
        raise _fail(f"{where}.name", f"{name!r} is not a valid Service name (DNS-1035 label)")
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS1123.match(namespace):
        raise _fail(f"{where}.namespace", f"{namespace!r} is not a valid namespace name")
    try:
        service_type = ServiceType(raw.get("type", ServiceType.CLUSTER_IP.value))
    except ValueError:
        raise _fail(
            f"{where}.type", f"must be one of {', '.join(t.value for t in ServiceType)}"
        ) from None
    ports_raw = raw.get("ports")
    if not isinstance(ports_raw, list) or not ports_raw:
        raise _fail(f"{where}.ports", "a Service needs a list of at least one port")
    ports = tuple(
        _parse_port(p, f"{where}.ports[{i}]", service_type) for i, p in enumerate(ports_raw)
    )
    _check_port_names(ports, f"{where}.ports")
    cluster_ip = _parse_cluster_ip(raw.get("clusterIP"), f"{where}.clusterIP")
    if cluster_ip is None and service_type is not ServiceType.CLUSTER_IP:
        raise _fail(f"{where}.clusterIP", "a headless Service cannot be a NodePort Service")
    if service_type is not ServiceType.CLUSTER_IP:
        for i, port in enumerate(ports):
            if port.node_port is None:
                raise _fail(
                    f"{where}.ports[{i}].nodePort",
                    "the lab does not allocate node ports; fix: give one from "
                    f"{NODE_PORT_RANGE[0]} to {NODE_PORT_RANGE[1]}",
                )
    selector = None
    if "selector" in raw:
        selector = _string_map(raw["selector"], f"{where}.selector")
    endpoints_raw = raw.get("endpoints") or []
    if not isinstance(endpoints_raw, list):
        raise _fail(f"{where}.endpoints", "must be a list of {ip, ports} endpoints")
    endpoints = tuple(
        _parse_endpoint(e, f"{where}.endpoints[{i}]") for i, e in enumerate(endpoints_raw)
    )
    if endpoints and selector is not None:
        raise _fail(
            f"{where}.endpoints",
            "a Service with a selector gets its endpoints from its pods; fix: drop either",
        )
    return LabService(
        name=name,
        namespace=namespace,
        ports=ports,
        type=service_type,
        cluster_ip=cluster_ip,
        selector=selector,
        endpoints=endpoints,
    )


def _check_port_names(ports: Sequence[ServicePort], where: str) -> None:
    if len(ports) > 1 and any(not p.name for p in ports):
        raise _fail(where, "every port of a multi-port Service needs a name")
    seen: set[object] = set()
    for what, values in (
        ("name", [p.name for p in ports]),
        ("port", [(p.port, p.protocol) for p in ports]),
        ("nodePort", [p.node_port for p in ports if p.node_port is not None]),
    ):
        seen.clear()
        for value in values:
            if value in seen:
                raise _fail(where, f"two ports share the {what} {value!r}")
            seen.add(value)


def _parse_cluster_ip(value: object, where: str) -> str | None:
    if value is None or value == "":
        return ""
    if value == HEADLESS:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise _fail(where, f"{value!r} is not an IPv4 address, 'None' or empty") from None
    network = ipaddress.IPv4Network(LAB_SERVICE_CIDR)
    if address not in network or address in (network.network_address, network.broadcast_address):
        raise _fail(
            where, f"{address} is not an assignable address of the lab's Service range {network}"
        )
    return str(address)


def _parse_endpoint(raw: object, where: str) -> Endpoint:
    if not isinstance(raw, Mapping) or set(raw) - {"ip", "ports"} or "ip" not in raw:
        raise _fail(where, "an endpoint is {ip: <IPv4>, ports: {<port name>: <number>}}")
    try:
        ip = ipaddress.IPv4Address(raw["ip"])
    except ValueError:
        raise _fail(f"{where}.ip", f"{raw['ip']!r} is not an IPv4 address") from None
    ports = raw.get("ports") or {}
    if not isinstance(ports, Mapping):
        raise _fail(f"{where}.ports", "must map port names to numbers")
    return Endpoint(
        ip,
        {str(k): _port_number(v, f"{where}.ports.{k}") for k, v in ports.items()},
    )


def plan_cluster_ips(
    services: Sequence[LabService], current: Mapping[str, str]
) -> list[LabService]:
    """Give each Service without a fixed address one from LAB_SERVICE_CIDR, keeping the one
    it had (`current`: key -> ClusterIP of the last `lab up`), as the apiserver keeps a
    Service's ClusterIP for its lifetime. Raises LabServiceError for two Services fixing
    the same address."""
    network = ipaddress.IPv4Network(LAB_SERVICE_CIDR)
    fixed: dict[str, str] = {}
    for service in services:
        if service.cluster_ip:
            if service.cluster_ip in fixed:
                raise LabServiceError(
                    f"services {fixed[service.cluster_ip]} and {service.key} both ask for "
                    f"clusterIP {service.cluster_ip}"
                )
            fixed[service.cluster_ip] = service.key
    taken = set(fixed)
    planned: list[LabService] = []
    free = (str(h) for h in network.hosts())
    for service in services:
        ip = service.cluster_ip
        if ip == "":
            kept = current.get(service.key)
            if kept and kept not in taken and ipaddress.IPv4Address(kept) in network:
                ip = kept
            else:
                ip = next(a for a in free if a not in taken and a not in current.values())
            taken.add(ip)
        planned.append(
            LabService(
                name=service.name,
                namespace=service.namespace,
                ports=service.ports,
                type=service.type,
                cluster_ip=ip,
                selector=service.selector,
                endpoints=service.endpoints,
            )
        )
    return planned


def default_lab_services() -> list[LabService]:
    """The embedded default's Services: web's HTTP port by name (also a NodePort on the
    node's address), api's by number."""
    return [
        LabService(
            name="web",
            namespace="default",
            selector={"app": "web"},
            ports=(ServicePort(80, "http", name="http", node_port=30080),),
            type=ServiceType.NODE_PORT,
        ),
        LabService(
            name="api",
            namespace="default",
            selector={"app": "api"},
            ports=(ServicePort(7000, 7000, name="tcp"),),
        ),
    ]
