"""The local node's pods as data: what to create (specs), what exists (state), and the
one parser of the state file that `steer lab up` writes.

Pure: nothing here touches the kernel, so the control plane's and agent's local inputs
(`steer.source.local`) read the same state with the same code as the lab itself.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypedDict

import yaml

from steer.constants import (
    LAB_GATEWAY_IP,
    LAB_NODE_NAME,
    LAB_POD_CIDR,
    LAB_SERVICE_CIDR,
    NODE_NETNS,
    POD_NETNS_PREFIX,
    POD_VETH_PREFIX,
)
from steer.lab.services import LabService, LabServiceError, LabServiceJSON, parse_lab_service

# Netns names show up in `ip netns list` and cgroup names in `systemd-cgls`, so they
# stay readable; past this length the tail is replaced by a hash to stay unique.
NETNS_NAME_MAX = 64
NODE_CGROUP_NAME = "node"

_HASH_LEN = 8
VETH_RE = re.compile(rf"^{re.escape(POD_VETH_PREFIX)}[0-9a-f]{{{_HASH_LEN}}}$")
# RFC 1123 subdomain, which is what Kubernetes accepts for pod and namespace names;
# it also guarantees a name can never smuggle a "/" into a netns or cgroup path.
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_K8S_NAME_MAX = 253


class LabError(RuntimeError):
    """The lab could not be brought to the requested state."""


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    # A copy, so the caller's dict can change without changing a "frozen" value.
    return MappingProxyType(dict(mapping))


def _metadata() -> Any:
    # Compared but not hashed: a mapping has no hash, and leaving it out keeps the
    # frozen dataclasses usable as set members and dict keys.
    return field(default_factory=dict, hash=False)


def _name_hash(namespace: str, name: str) -> str:
    return hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:_HASH_LEN]


def pod_key(namespace: str, name: str) -> str:
    """The per-pod suffix shared by the netns name and the cgroup directory."""
    key = f"{namespace}-{name}"
    room = NETNS_NAME_MAX - len(POD_NETNS_PREFIX)
    if len(key) <= room:
        return key
    return f"{key[: room - _HASH_LEN - 1]}-{_name_hash(namespace, name)}"


def pod_netns_name(namespace: str, name: str) -> str:
    return POD_NETNS_PREFIX + pod_key(namespace, name)


def pod_veth_name(namespace: str, name: str) -> str:
    # A hash, not the name: interface names are capped at 15 characters (IFNAMSIZ).
    return POD_VETH_PREFIX + _name_hash(namespace, name)


@dataclass(frozen=True)
class LabPodSpec:
    name: str
    namespace: str = "default"
    labels: Mapping[str, str] = _metadata()
    annotations: Mapping[str, str] = _metadata()
    # The labels of the pod's namespace; the lab has no Namespace objects of its own.
    namespace_labels: Mapping[str, str] = _metadata()
    # Named container ports (name -> number), for Services whose targetPort is a name.
    ports: Mapping[str, int] = _metadata()

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("namespace", self.namespace)):
            if len(value) > _K8S_NAME_MAX or not _K8S_NAME_RE.match(value):
                raise ValueError(f"pod {what} {value!r} is not a valid Kubernetes name")
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))
        object.__setattr__(self, "namespace_labels", _frozen(self.namespace_labels))
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))


class LabNodeJSON(TypedDict):
    netns: str
    name: str
    gateway: str
    pod_cidr: str
    cgroup: str
    service_cidr: str


class _LabPodJSONBase(TypedDict):
    name: str
    namespace: str
    netns: str
    ip: str
    cgroup: str
    veth: str
    labels: dict[str, str]
    annotations: dict[str, str]
    namespace_labels: dict[str, str]


class LabPodJSON(_LabPodJSONBase, total=False):
    ports: dict[str, int]


class LabStateJSON(TypedDict):
    node: LabNodeJSON
    pods: list[LabPodJSON]
    services: list[LabServiceJSON]


def _str_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} must map strings to strings")
    return dict(value)


def _port_map(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
        for k, v in value.items()
    ):
        raise ValueError(f"{what} must map port names to numbers from 1 to 65535")
    return dict(value)


def _str(obj: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = obj[key] if default is None else obj.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LabPod:
    name: str
    namespace: str
    ip: str
    netns: str
    cgroup: str
    veth: str
    labels: Mapping[str, str] = _metadata()
    annotations: Mapping[str, str] = _metadata()
    namespace_labels: Mapping[str, str] = _metadata()
    ports: Mapping[str, int] = _metadata()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))
        object.__setattr__(self, "namespace_labels", _frozen(self.namespace_labels))
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    def to_json(self) -> LabPodJSON:
        document = self._json()
        if self.ports:
            document["ports"] = dict(self.ports)
        return document

    def _json(self) -> LabPodJSON:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "netns": self.netns,
            "ip": self.ip,
            "cgroup": self.cgroup,
            "veth": self.veth,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "namespace_labels": dict(self.namespace_labels),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabPod:
        return cls(
            name=_str(data, "name"),
            namespace=_str(data, "namespace", "default"),
            ip=str(ipaddress.IPv4Address(_str(data, "ip"))),
            netns=_str(data, "netns", ""),
            cgroup=_str(data, "cgroup", ""),
            veth=_str(data, "veth", ""),
            labels=_str_map(data.get("labels", {}), "labels"),
            annotations=_str_map(data.get("annotations", {}), "annotations"),
            namespace_labels=_str_map(data.get("namespace_labels", {}), "namespace_labels"),
            ports=_port_map(data.get("ports", {}), "ports"),
        )


@dataclass(frozen=True)
class LabState:
    node_netns: str
    node_name: str
    gateway_ip: str
    pod_cidr: str
    pods: tuple[LabPod, ...]
    # Where node processes (Envoy, the agent) belong; empty if not recorded.
    node_cgroup: str = ""
    services: tuple[LabService, ...] = ()
    service_cidr: str = LAB_SERVICE_CIDR

    def pod(self, namespace: str, name: str) -> LabPod:
        for pod in self.pods:
            if (pod.namespace, pod.name) == (namespace, name):
                return pod
        raise KeyError(f"{namespace}/{name}")

    def to_json(self) -> LabStateJSON:
        return {
            "node": {
                "netns": self.node_netns,
                "name": self.node_name,
                "gateway": self.gateway_ip,
                "pod_cidr": self.pod_cidr,
                "cgroup": self.node_cgroup,
                "service_cidr": self.service_cidr,
            },
            "pods": [pod.to_json() for pod in self.pods],
            "services": [service.to_json() for service in self.services],
        }

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        parse_pod: Callable[[Mapping[str, Any]], LabPod] = LabPod.from_json,
    ) -> LabState:
        """Parse what ``to_json`` wrote; raises ValueError (or KeyError, TypeError) on
        anything else. A missing node section means the lab's defaults, and a pod's
        optional fields may be left out (hand-written states in tests and tools).
        `parse_pod`: LabPod.from_json, or a cache of it (`LabPodCache`)."""
        node = data.get("node", {})
        pods = data["pods"]
        if not isinstance(node, Mapping) or not isinstance(pods, list):
            raise ValueError("lab state needs a 'node' object and a 'pods' list")
        return cls(
            node_netns=str(node.get("netns", NODE_NETNS)),
            node_name=str(node.get("name", LAB_NODE_NAME)),
            gateway_ip=str(node.get("gateway", LAB_GATEWAY_IP)),
            pod_cidr=str(node.get("pod_cidr", LAB_POD_CIDR)),
            node_cgroup=str(node.get("cgroup", "")),
            pods=tuple(parse_pod(pod) for pod in pods),
            services=tuple(LabService.from_json(s) for s in data.get("services", [])),
            service_cidr=str(node.get("service_cidr", LAB_SERVICE_CIDR)),
        )

    @classmethod
    def from_text(
        cls, text: str, parse_pod: Callable[[Mapping[str, Any]], LabPod] = LabPod.from_json
    ) -> LabState | None:
        """The state file's text; None for an empty text (the lab is not up). Raises
        ValueError (with the cause) if it is not what `steer lab up` writes."""
        if not text:
            return None
        try:
            return cls.from_json(json.loads(text), parse_pod)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"lab state malformed ({type(exc).__name__}: {exc})") from None


class LabPodCache:
    """LabPod.from_json that hands back the very same LabPod for an entry equal to the one
    it parsed last time under that pod's name: a lab state rewritten for one pod's change
    re-parses that pod only (at 1k pods a full parse took ~35 ms of every change)."""

    def __init__(self) -> None:
        self._last: dict[tuple[object, object], tuple[Mapping[str, Any], LabPod]] = {}
        self._seen: dict[tuple[object, object], tuple[Mapping[str, Any], LabPod]] = {}

    def __call__(self, data: Mapping[str, Any]) -> LabPod:
        key = (data.get("namespace"), data.get("name"))
        cached = self._seen.get(key) or self._last.get(key)
        if cached is None or cached[0] != data:
            cached = (data, LabPod.from_json(data))
        self._seen[key] = cached
        return cached[1]

    def forget_unseen(self) -> None:
        """Keep only the pods of the last state parsed, so the cache follows the lab."""
        self._last, self._seen = self._seen, {}


# The ports the embedded default's pods name (web serves HTTP on 8080 in the demo).
_DEFAULT_NAMED_PORTS: Mapping[str, Mapping[str, int]] = {"web": {"http": 8080}}


def default_lab_specs() -> list[LabPodSpec]:
    return [
        LabPodSpec(name=app, labels={"app": app}, ports=_DEFAULT_NAMED_PORTS.get(app, {}))
        for app in ("client", "web", "api")
    ]


def check_unique(specs: Sequence[LabPodSpec]) -> None:
    seen: dict[str, LabPodSpec] = {}
    for spec in specs:
        for naming in (pod_netns_name, pod_veth_name):
            key = naming(spec.namespace, spec.name)
            other = seen.setdefault(key, spec)
            if other is not spec:
                raise ValueError(
                    f"pods {other.namespace}/{other.name} and {spec.namespace}/{spec.name}"
                    f" would share {key!r}"
                )


def plan_ips(current: Sequence[str | None]) -> list[str]:
    """Give each pod an address, keeping the one it already has (``current``, in spec
    order) where possible.

    A fresh lab therefore numbers pods in spec order; a pod that survives a change of
    specs keeps its address, because other state (conntrack, policies) refers to it.
    """
    network = ipaddress.ip_network(LAB_POD_CIDR)
    reserved = {network.network_address, network.broadcast_address}
    reserved.add(ipaddress.ip_address(LAB_GATEWAY_IP))

    def assignable(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address in network and address not in reserved

    taken: set[str] = set()
    kept: list[str | None] = []
    for ip in current:
        if ip is not None and ip not in taken and assignable(ip):
            kept.append(ip)
            taken.add(ip)
        else:
            kept.append(None)
    free = (str(h) for h in network.hosts() if h not in reserved and str(h) not in taken)
    try:
        return [ip if ip is not None else next(free) for ip in kept]
    except StopIteration:
        raise LabError(f"{LAB_POD_CIDR} has no room for {len(current)} pods") from None


@dataclass(frozen=True)
class LabConfig:
    pods: list[LabPodSpec]
    services: list[LabService]


def lab_specs_from_yaml(text: str, source: str) -> list[LabPodSpec]:
    return lab_config_from_yaml(text, source).pods


def lab_config_from_yaml(text: str, source: str) -> LabConfig:
    """Pods and Services from a lab file:

    namespaces:             # optional: labels of each namespace
      default: {steer.dev/allow-exclusions: "true"}
    pods:
      - {name: web, namespace: default, labels: {app: web}, annotations: {...},
         ports: {http: 8080}}
    services:               # optional: see steer.lab.services
      - {name: web, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
    """
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise LabError(f"{source}: malformed YAML: {exc}; fix the syntax") from None
    if not isinstance(document, dict) or set(document) - {"namespaces", "pods", "services"}:
        raise LabError(f"{source}: expected a mapping with keys 'namespaces', 'pods', 'services'")
    namespaces = document.get("namespaces") or {}
    pods = document.get("pods") or []
    services = document.get("services") or []
    if not isinstance(namespaces, dict) or not isinstance(pods, list):
        raise LabError(f"{source}: 'namespaces' must be a mapping and 'pods' a list")
    if not isinstance(services, list):
        raise LabError(f"{source}: 'services' must be a list")
    specs = []
    for index, pod in enumerate(pods):
        where = f"{source}: pods[{index}]"
        if not isinstance(pod, dict) or "name" not in pod:
            raise LabError(f"{where}: each pod needs at least a 'name'")
        unknown = set(pod) - {"name", "namespace", "labels", "annotations", "ports"}
        if unknown:
            raise LabError(f"{where}: unknown field(s) {sorted(unknown)}; fix: remove them")
        namespace = str(pod.get("namespace", "default"))
        try:
            specs.append(
                LabPodSpec(
                    name=str(pod["name"]),
                    namespace=namespace,
                    labels=_str_map(pod.get("labels", {}), "labels"),
                    annotations=_str_map(pod.get("annotations", {}), "annotations"),
                    namespace_labels=_str_map(namespaces.get(namespace, {}), "namespace labels"),
                    ports=_port_map(pod.get("ports", {}), "ports"),
                )
            )
        except ValueError as exc:
            raise LabError(f"{where}: {exc}") from None
    parsed: list[LabService] = []
    keys: set[str] = set()
    node_ports: dict[int, str] = {}
    for index, raw in enumerate(services):
        try:
            service = parse_lab_service(raw, f"services[{index}]")
        except LabServiceError as exc:
            raise LabError(f"{source}: {exc}") from None
        if service.key in keys:
            raise LabError(f"{source}: services[{index}]: a second Service {service.key}")
        keys.add(service.key)
        for port in service.ports:
            if port.node_port is None:
                continue
            if port.node_port in node_ports:
                raise LabError(
                    f"{source}: services[{index}]: nodePort {port.node_port} is already "
                    f"{node_ports[port.node_port]}'s; fix: choose another"
                )
            node_ports[port.node_port] = service.key
        parsed.append(service)
    return LabConfig(specs, parsed)
