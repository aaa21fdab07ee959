"""Versioned per-node xDS snapshots and per-node push status.

The cache is the meeting point of the renderer (which produces a whole configuration
for a node at once) and the ADS streams (which push it). It never talks gRPC: a stream
handler reads the current snapshot, waits for the next one, and reports what the node
did with each push, so the control plane can tell an operator which nodes run which
configuration and why a node refused one.

Everything here is meant to be used from one asyncio event loop: ``set_snapshot`` and
the ``record_*`` methods are plain synchronous calls that wake waiters on that loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message

from steer.render.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HCM_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    type_url,
)

# Make-before-break: a cluster must exist before a route can point at it, and a listener
# before the RDS config it names is of any use, so updates go out in this order.
PUSH_ORDER: Final = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
# Envoy subscribes to every listener and cluster (wildcard), but to routes and endpoints
# by the names its listeners and clusters mention.
WILDCARD_TYPES: Final = frozenset({LISTENER_TYPE, CLUSTER_TYPE})

# Hex digits kept from a sha256; 64 bits is plenty to tell configurations apart and keeps
# versions readable in logs and in Envoy's config_dump.
VERSION_DIGITS: Final = 16


class InconsistentSnapshot(ValueError):
    """A snapshot refers to something it does not contain; Envoy would stall on it."""


def resource_name(msg: Message) -> str:
    """The name Envoy knows a resource by (ClusterLoadAssignment calls it cluster_name)."""
    # Message declares no fields, and the concrete Envoy classes carry no types.
    fields: Any = msg
    if msg.DESCRIPTOR.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(fields.cluster_name)
    return str(fields.name)


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        # Length prefixes keep ("ab", "c") and ("a", "bc") from hashing alike.
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:VERSION_DIGITS]


@dataclass(frozen=True)
class _Encoded:
    message: Message
    data: bytes
    version: str

    @classmethod
    def of(cls, message: Message) -> _Encoded:
        data = message.SerializeToString(deterministic=True)
        return cls(message, data, _digest([data]))

    @cached_property
    def references(self) -> _References:
        # Kept with the encoding, so an unchanged listener (2k HCMs to unpack at 1k pods)
        # is not read again by every snapshot's consistency check.
        return _references(self.message)


@dataclass(frozen=True)
class Snapshot:
    """One node's whole configuration: type_url -> resource name -> resource.

    The snapshot takes ownership of the messages: versions are computed once, so a
    message mutated after the snapshot was built would be pushed under a stale version.
    """

    resources: Mapping[str, Mapping[str, Message]]

    def __post_init__(self) -> None:
        # Freeze the containers so a caller's later edits to its dicts cannot change a
        # snapshot that is already being served.
        frozen = {t: MappingProxyType(dict(byname)) for t, byname in self.resources.items()}
        object.__setattr__(self, "resources", MappingProxyType(frozen))

    @classmethod
    def of(cls, *messages: Message) -> Snapshot:
        """Build a snapshot from resources, keyed by their type and their own names."""
        resources: dict[str, dict[str, Message]] = {}
        for msg in messages:
            byname = resources.setdefault(type_url(msg), {})
            name = resource_name(msg)
            if name in byname:
                raise InconsistentSnapshot(f"duplicate {msg.DESCRIPTOR.name} {name!r}")
            byname[name] = msg
        return cls(resources)

    def get(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, MappingProxyType({}))

    def reuse_encodings(self, previous: Snapshot) -> None:
        """Take over the encodings of the messages this snapshot shares with `previous`
        (the very same objects, as an incremental renderer hands back). At 1k pods a
        snapshot holds ~2k resources; encoding and hashing all of them on every change
        cost more than rendering the one that changed."""
        known = previous.__dict__.get("_encodings")
        if known is None or "_encodings" in self.__dict__:
            return
        # Keyed by id: `known` holds its messages alive, so an id found here is the object.
        reusable = {id(e.message): e for byname in known.values() for e in byname.values()}
        self.__dict__["_encodings"] = self._encode(reusable)

    @cached_property
    def _encodings(self) -> Mapping[str, Mapping[str, _Encoded]]:
        return self._encode({})

    def _encode(self, reusable: Mapping[int, _Encoded]) -> dict[str, dict[str, _Encoded]]:
        return {
            type_url: {
                name: reusable.get(id(msg)) or _Encoded.of(msg) for name, msg in byname.items()
            }
            for type_url, byname in self.resources.items()
        }

    @cached_property
    def _resource_versions(self) -> Mapping[str, Mapping[str, str]]:
        return {
            type_url: {name: e.version for name, e in byname.items()}
            for type_url, byname in self._encodings.items()
        }

    @cached_property
    def _versions(self) -> Mapping[str, str]:
        # Over names and per-resource versions: equal content still means equal version,
        # without hashing every resource's bytes again.
        return {
            type_url: _digest(
                part for name in sorted(byname) for part in (name.encode(), byname[name].encode())
            )
            for type_url, byname in self._resource_versions.items()
        }

    def packed(self, type_url: str, name: str) -> any_pb2.Any:
        """The resource as the Any a discovery response carries, from its one encoding."""
        return any_pb2.Any(type_url=type_url, value=self._encodings[type_url][name].data)

    def version(self, type_url: str) -> str:
        """Content hash of every resource of one type; equal content, equal version."""
        return self._versions.get(type_url) or _digest([])

    def resource_version(self, type_url: str, name: str) -> str:
        """Content hash of one resource (the per-resource version of delta xDS)."""
        try:
            return self._resource_versions[type_url][name]
        except KeyError:
            raise KeyError(f"no {type_url} named {name!r} in snapshot") from None

    def resource_versions(self, type_url: str) -> Mapping[str, str]:
        return self._resource_versions.get(type_url, {})

    def check_consistency(self) -> None:
        """Raise InconsistentSnapshot listing every dangling reference and misnamed key.

        Envoy does not reject a listener whose RDS name or a route whose cluster is
        missing; it waits for it (warming) or answers 503, which is much harder to
        diagnose than refusing the snapshot here.
        """
        problems: list[str] = []
        for kind, byname in self.resources.items():
            for key, msg in byname.items():
                if resource_name(msg) != key:
                    problems.append(
                        f"{kind.rsplit('.', 1)[-1]} stored as {key!r} "
                        f"is named {resource_name(msg)!r}"
                    )

        routes = self.get(ROUTE_TYPE)
        clusters = self.get(CLUSTER_TYPE)
        endpoints = self.get(ENDPOINT_TYPE)
        encodings = self._encodings
        for name, encoded in encodings.get(LISTENER_TYPE, {}).items():
            refs = encoded.references
            problems += [
                f"listener {name!r} uses missing route {r!r}"
                for r in refs.routes
                if r not in routes
            ]
            problems += [
                f"listener {name!r} inline route vhost {v!r} uses missing cluster {c!r}"
                for v, c in refs.clusters
                if c not in clusters
            ]
        for name, encoded in encodings.get(ROUTE_TYPE, {}).items():
            problems += [
                f"route {name!r} vhost {v!r} uses missing cluster {c!r}"
                for v, c in encoded.references.clusters
                if c not in clusters
            ]
        for name, encoded in encodings.get(CLUSTER_TYPE, {}).items():
            service = encoded.references.endpoints
            if service is not None and service not in endpoints:
                problems.append(f"EDS cluster {name!r} has no endpoints {service!r}")

        if problems:
            raise InconsistentSnapshot("; ".join(problems))


@dataclass(frozen=True)
class _References:
    """The names one resource uses of others."""

    routes: tuple[str, ...] = ()  # RDS route configurations (listeners)
    clusters: tuple[tuple[str, str], ...] = ()  # (virtual host, cluster) of its routes
    endpoints: str | None = None  # the EDS service (clusters)


def _references(message: Message) -> _References:
    kind = message.DESCRIPTOR.full_name
    if kind == listener_pb2.Listener.DESCRIPTOR.full_name:
        return _listener_references(message)
    if kind == route_pb2.RouteConfiguration.DESCRIPTOR.full_name:
        return _References(clusters=tuple(_route_clusters(message)))
    if kind == cluster_pb2.Cluster.DESCRIPTOR.full_name:
        return _cluster_references(message)
    return _References()


# The helpers below take the concrete Envoy messages: the generated envoy modules are
# untyped, so these annotations let field access through where Message would not.


def _listener_references(listener: listener_pb2.Listener) -> _References:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    routes: list[str] = []
    clusters: list[tuple[str, str]] = []
    for chain in chains:
        for flt in chain.filters:
            # In v3 the typed_config's type, not the filter's free-form name, picks the
            # extension, so match on the type to catch HCMs whatever they are called.
            if not (flt.HasField("typed_config") and flt.typed_config.type_url == HCM_TYPE):
                continue
            hcm = http_connection_manager_pb2.HttpConnectionManager()
            flt.typed_config.Unpack(hcm)
            if hcm.HasField("rds"):
                routes.append(hcm.rds.route_config_name)
            elif hcm.HasField("route_config"):
                clusters += _route_clusters(hcm.route_config)
    return _References(routes=tuple(routes), clusters=tuple(clusters))


def _cluster_references(cluster: cluster_pb2.Cluster) -> _References:
    if cluster.type == cluster_pb2.Cluster.EDS:
        return _References(endpoints=cluster.eds_cluster_config.service_name or cluster.name)
    return _References()


def _route_clusters(route_config: route_pb2.RouteConfiguration) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for vhost in route_config.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            action = route.route
            names = [action.cluster] if action.cluster else []
            names += [w.name for w in action.weighted_clusters.clusters]
            found += [(vhost.name, name) for name in names]
    return found


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str
    detail: str
    at: float


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    acked: Mapping[str, str]
    """type_url -> last version the node accepted."""
    sent: Mapping[str, str]
    """type_url -> last version pushed to the node (accepted or not)."""
    last_nack: Nack | None
    pushes: int
    acks: int
    nacks: int
    streams: int
    """ADS streams open right now for this node id."""


class PushRejected(Exception):
    """The node NACKed the version a caller was waiting for."""

    def __init__(self, node_id: str, nack: Nack) -> None:
        super().__init__(
            f"node {node_id} rejected {nack.type_url} version {nack.version}: {nack.detail}"
        )
        self.node_id = node_id
        self.nack = nack


class _Signal:
    """A broadcast wake-up: every current waiter wakes, later waiters wait for the next."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class _Node:
    snapshot: Snapshot | None = None
    # Bumped on every accepted set_snapshot so a waiter can tell "changed since I looked"
    # apart from "woken for nothing".
    generation: int = 0
    changed: _Signal = field(default_factory=_Signal)
    status_changed: _Signal = field(default_factory=_Signal)
    acked: dict[str, str] = field(default_factory=dict)
    sent: dict[str, str] = field(default_factory=dict)
    last_nack: Nack | None = None
    pushes: int = 0
    acks: int = 0
    nacks: int = 0
    streams: int = 0
    # When the current snapshot was installed, and the last generation the node accepted
    # whole: for the propagation time.
    installed_at: float = 0.0
    propagated: int = 0


class SnapshotCache:
    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        # Called with (node, seconds) once a node has accepted every type of a snapshot,
        # seconds after it was installed.
        self.on_propagated: Callable[[str, float], None] | None = None

    def _node(self, node_id: str) -> _Node:
        return self._nodes.setdefault(node_id, _Node())

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> bool:
        """Install a snapshot; False (and nothing happens) if no type's version changed."""
        node = self._node(node_id)
        old = node.snapshot
        if old is not None:
            snapshot.reuse_encodings(old)
        snapshot.check_consistency()
        if old is not None:
            types = set(old.resources) | set(snapshot.resources)
            if all(old.version(t) == snapshot.version(t) for t in types):
                return False
        node.snapshot = snapshot
        node.generation += 1
        node.installed_at = time.monotonic()
        node.changed.fire()
        # The target of wait_for_ack moved, so its waiters must re-evaluate.
        node.status_changed.fire()
        return True

    def get(self, node_id: str) -> Snapshot | None:
        node = self._nodes.get(node_id)
        return node.snapshot if node else None

    def generation(self, node_id: str) -> int:
        """A counter that grows with every accepted snapshot (0: none yet)."""
        node = self._nodes.get(node_id)
        return node.generation if node else 0

    async def wait_for_change(self, node_id: str, seen: int) -> int:
        """Return the node's generation once it differs from ``seen``."""
        node = self._node(node_id)
        while node.generation == seen:
            await node.changed.wait()
        return node.generation

    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    # --- push bookkeeping, fed by the ADS streams ------------------------------------------

    def stream_opened(self, node_id: str) -> None:
        self._node(node_id).streams += 1

    def stream_closed(self, node_id: str) -> None:
        self._node(node_id).streams -= 1

    def record_push(self, node_id: str, type_url: str, version: str) -> None:
        node = self._node(node_id)
        node.pushes += 1
        node.sent[type_url] = version
        node.status_changed.fire()

    def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        node = self._node(node_id)
        node.acks += 1
        node.acked[type_url] = version
        node.status_changed.fire()
        snap = node.snapshot
        if (
            self.on_propagated is not None
            and snap is not None
            and node.propagated != node.generation
            and all(
                node.acked.get(t) == snap.version(t)
                for t, byname in snap.resources.items()
                if byname
            )
        ):
            node.propagated = node.generation
            self.on_propagated(node_id, time.monotonic() - node.installed_at)

    def record_nack(
        self, node_id: str, type_url: str, version_attempted: str, error_detail: str
    ) -> None:
        node = self._node(node_id)
        node.nacks += 1
        node.last_nack = Nack(type_url, version_attempted, error_detail, time.time())
        node.status_changed.fire()

    def status(self, node_id: str) -> NodeStatus:
        node = self._node(node_id)
        return NodeStatus(
            node_id=node_id,
            acked=dict(node.acked),
            sent=dict(node.sent),
            last_nack=node.last_nack,
            pushes=node.pushes,
            acks=node.acks,
            nacks=node.nacks,
            streams=node.streams,
        )

    def status_touched(self, node_id: str) -> None:
        """Something a status writer reports changed outside the cache (a reload)."""
        self._node(node_id).status_changed.fire()

    async def wait_for_status_change(self, node_id: str) -> None:
        """Return at the node's next push, ACK, NACK, snapshot or `status_touched`."""
        await self._node(node_id).status_changed.wait()

    async def wait_for_ack(
        self, node_id: str, type_urls: Iterable[str] | None = None
    ) -> NodeStatus:
        """Wait until the node has accepted the current snapshot.

        ``type_urls`` defaults to the types the snapshot has resources of: a node
        subscribes to routes and endpoints only once something refers to them, so an
        empty type may never be acknowledged. Raises PushRejected as soon as the node
        NACKs a version being waited for. Bound the wait with asyncio.timeout.
        """
        node = self._node(node_id)
        wanted = None if type_urls is None else tuple(type_urls)
        while True:
            snap = node.snapshot
            if snap is not None:
                types = wanted
                if types is None:
                    types = tuple(t for t, byname in snap.resources.items() if byname)
                nack = node.last_nack
                if nack is not None and any(
                    nack.type_url == t and nack.version == snap.version(t) for t in types
                ):
                    raise PushRejected(node_id, nack)
                if all(node.acked.get(t) == snap.version(t) for t in types):
                    return self.status(node_id)
            await node.status_changed.wait()
