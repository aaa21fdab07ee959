"""Aggregated Discovery Service (ADS) over grpc.aio, state-of-the-world and delta.

Each stream is a small state machine per resource type: what the client subscribed
to, what was last sent (version + nonce), and whether the client accepted it. The two
protocol variants share that bookkeeping (``_Stream``) and differ only in how a
subscription is expressed and in what a response carries.

Over TCP the server can require mutual TLS (``XdsServerTls``): a client must present a
certificate from steer's CA, and a stream is served only for the node that certificate
names (``steer.control.certs.node_identity``); any other node id is refused with
PERMISSION_DENIED. The Unix socket of local mode is guarded by its file mode instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import stat
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeAlias

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from steer.constants import XDS_NODE_IDENTITY_PREFIX
from steer.control.cache import PUSH_ORDER, WILDCARD_TYPES, Snapshot, SnapshotCache
from steer.control.certs import node_identity

log = logging.getLogger("steer.xds")

WILDCARD: Final = "*"
# Stands for "the client holds some version, but not one we know": set after a NACK,
# because the client kept its previous copy of what it rejected. Never a real version.
UNKNOWN_VERSION: Final = ""
# The control plane notices an Envoy that vanished without closing its stream (its
# netns deleted, the node rebooted) within about keepalive time + timeout, so the
# node's connected-stream count stays truthful.
KEEPALIVE_TIME_MS: Final = 30_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000

# discovery_pb2.DiscoveryRequest / DeltaDiscoveryRequest and their responses; the
# generated protos carry no types, so naming them would only be a comment anyway.
_Request: TypeAlias = Any
_Response: TypeAlias = Any


def _kind(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


@dataclass
class _Subscription:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)

    def replace(self, type_url: str, names: Iterable[str]) -> bool:
        """State of the world: the request lists the whole subscription. True if changed."""
        new = set(names)
        wildcard = type_url in WILDCARD_TYPES and (not new or WILDCARD in new)
        new.discard(WILDCARD)
        changed = (wildcard, new) != (self.wildcard, self.names)
        self.wildcard, self.names = wildcard, new
        return changed

    def update(
        self, type_url: str, subscribe: Iterable[str], unsubscribe: Iterable[str], first: bool
    ) -> bool:
        """Delta: the request lists additions and removals. True if changed."""
        add, drop = set(subscribe), set(unsubscribe)
        before = (self.wildcard, set(self.names))
        # A first request naming nothing is the legacy way to ask for everything.
        if first and not add and type_url in WILDCARD_TYPES:
            self.wildcard = True
        if WILDCARD in add:
            self.wildcard = True
        if WILDCARD in drop:
            self.wildcard = False
        self.names |= add - {WILDCARD}
        self.names -= drop
        return before != (self.wildcard, self.names)

    def covers(self, name: str) -> bool:
        return self.wildcard or name in self.names


@dataclass
class _TypeState:
    sub: _Subscription = field(default_factory=_Subscription)
    nonce: str | None = None
    sent_version: str | None = None
    # Whether the last response carried everything the client is subscribed to; a
    # partial one (delta, holding back rejected resources) is no evidence that the
    # client runs sent_version, so its ACK is not recorded as one.
    complete: bool = True
    # The nonce already ACKed or NACKed: later requests repeating it (say, to change
    # the subscription) must not be counted again.
    settled_nonce: str | None = None
    nacked_version: str | None = None
    # Delta only: what the client holds, name -> per-resource version.
    client_versions: dict[str, str] = field(default_factory=dict)
    last_sent: frozenset[str] = frozenset()
    rejected: frozenset[str] = frozenset()


class _Stream(ABC):
    """Per-stream, per-type bookkeeping shared by SotW and delta."""

    kind: ClassVar[str]

    def __init__(self, cache: SnapshotCache, node_id: str) -> None:
        self.cache = cache
        self.node_id = node_id
        self.types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)

    @abstractmethod
    def on_request(self, req: _Request, snapshot: Snapshot | None) -> list[_Response]: ...

    @abstractmethod
    def _sync(
        self, type_url: str, state: _TypeState, snapshot: Snapshot, *, force: bool
    ) -> _Response | None:
        """A response bringing the client up to the snapshot, or None if it is there."""

    def on_snapshot(self, snapshot: Snapshot) -> list[_Response]:
        ordered: list[str] = [t for t in PUSH_ORDER if t in self.types]
        ordered += sorted(t for t in self.types if t not in PUSH_ORDER)
        responses = []
        for type_url in ordered:
            resp = self._sync(type_url, self.types[type_url], snapshot, force=False)
            if resp is not None:
                responses.append(resp)
        return responses

    def _state(self, type_url: str) -> tuple[_TypeState, bool]:
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = _TypeState()
            return state, True
        return state, False

    def _settle(self, type_url: str, state: _TypeState, req: _Request, claimed: str | None) -> bool:
        """Record what the request says about our last response; False if it is stale.

        ``claimed`` is the version the client says it runs (SotW), None for delta where
        the nonce alone identifies the response.
        """
        nonce = req.response_nonce
        if state.nonce is None:
            # Nothing sent on this stream yet; a nonce from an earlier stream means nothing.
            return True
        if nonce != state.nonce:
            # A newer response is already on its way to the client, which will answer
            # that one; acting on this request would act on outdated state.
            log.debug("node %s: stale nonce %r for %s", self.node_id, nonce, _kind(type_url))
            return False
        if state.settled_nonce == nonce:
            return True
        if req.HasField("error_detail"):
            state.settled_nonce = nonce
            state.nacked_version = state.sent_version
            detail = req.error_detail.message or f"gRPC code {req.error_detail.code}"
            log.warning(
                "node %s rejected %s version %s: %s",
                self.node_id,
                _kind(type_url),
                state.sent_version,
                detail,
            )
            self.cache.record_nack(self.node_id, type_url, state.sent_version or "", detail)
            # The client kept its previous copies of whatever it rejected.
            for name in state.last_sent:
                if name in state.client_versions:
                    state.client_versions[name] = UNKNOWN_VERSION
            state.rejected = state.last_sent
        elif claimed is None or claimed == state.sent_version:
            state.settled_nonce = nonce
            if state.complete and state.sent_version is not None:
                self.cache.record_ack(self.node_id, type_url, state.sent_version)
        return True

    def _stamp(
        self, type_url: str, state: _TypeState, version: str, *, complete: bool = True
    ) -> str:
        nonce = str(next(self._nonces))
        state.nonce = nonce
        state.sent_version = version
        state.complete = complete
        self.cache.record_push(self.node_id, type_url, version)
        log.debug(
            "node %s: pushing %s version %s nonce %s",
            self.node_id,
            _kind(type_url),
            version,
            nonce,
        )
        return nonce


class _SotwStream(_Stream):
    kind = "sotw"

    def on_request(self, req: _Request, snapshot: Snapshot | None) -> list[_Response]:
        state, first = self._state(req.type_url)
        if not self._settle(req.type_url, state, req, req.version_info):
            return []
        names_changed = state.sub.replace(req.type_url, req.resource_names)
        if snapshot is None:
            return []
        resp = self._sync(req.type_url, state, snapshot, force=first or names_changed)
        return [] if resp is None else [resp]

    def _sync(
        self, type_url: str, state: _TypeState, snapshot: Snapshot, *, force: bool
    ) -> _Response | None:
        version = snapshot.version(type_url)
        # After a NACK sent_version is the rejected one, so it is not sent again until
        # the snapshot moves on; the client keeps running its last good config.
        if not force and version == state.sent_version:
            return None
        resources = snapshot.get(type_url)
        names = sorted(n for n in resources if state.sub.covers(n))
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            resources=[snapshot.packed(type_url, n) for n in names],
            nonce=self._stamp(type_url, state, version),
        )


class _DeltaStream(_Stream):
    kind = "delta"

    def on_request(self, req: _Request, snapshot: Snapshot | None) -> list[_Response]:
        state, first = self._state(req.type_url)
        if first:
            state.client_versions = dict(req.initial_resource_versions)
        # Unlike SotW, subscription changes count even on a stale nonce: delta requests
        # are increments and the client will not repeat them.
        fresh = self._settle(req.type_url, state, req, None)
        changed = state.sub.update(
            req.type_url, req.resource_names_subscribe, req.resource_names_unsubscribe, first
        )
        for name in [n for n in state.client_versions if not state.sub.covers(n)]:
            del state.client_versions[name]
        if snapshot is None or not (fresh or changed):
            return []
        resp = self._sync(req.type_url, state, snapshot, force=first)
        return [] if resp is None else [resp]

    def _sync(
        self, type_url: str, state: _TypeState, snapshot: Snapshot, *, force: bool
    ) -> _Response | None:
        version = snapshot.version(type_url)
        versions = snapshot.resource_versions(type_url)
        held_back = state.rejected if version == state.nacked_version else frozenset()
        updated = sorted(
            name
            for name, v in versions.items()
            if state.sub.covers(name)
            and state.client_versions.get(name) != v
            and name not in held_back
        )
        removed = sorted(n for n in state.client_versions if n not in versions)
        # An empty response still goes out when only the type version moved (a resource
        # the client does not subscribe to changed) so that its ACK marks the node as
        # current; otherwise waiting for an ACK of that version would never end.
        if not (force or updated or removed or version != state.sent_version):
            return None
        for name in updated:
            state.client_versions[name] = versions[name]
        for name in removed:
            del state.client_versions[name]
        state.last_sent = frozenset(updated)
        complete = not any(state.sub.covers(n) for n in held_back)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            resources=[
                discovery_pb2.Resource(
                    name=name, version=versions[name], resource=snapshot.packed(type_url, name)
                )
                for name in updated
            ],
            removed_resources=removed,
            nonce=self._stamp(type_url, state, version, complete=complete),
        )


class _Eof:
    """The client closed its side of the stream (or it broke)."""


class _Changed:
    """The node's snapshot changed."""


_EOF: Final = _Eof()
_CHANGED: Final = _Changed()
_Queue: TypeAlias = asyncio.Queue[_Request | _Eof | _Changed]


@dataclass(frozen=True)
class XdsServerTls:
    """The xDS server's certificate and key, and the CA whose client certificates it
    accepts (the one that issues the nodes' certificates)."""

    cert: Path
    key: Path
    client_ca: Path


def _peer_node(context: grpc.aio.ServicerContext[_Request, _Response]) -> tuple[bool, str | None]:
    """(whether the peer came over TLS, the node its verified certificate names)."""
    auth = context.auth_context()
    if list(auth.get("transport_security_type") or ()) != [b"ssl"]:
        return False, None
    pems = list(auth.get("x509_pem_cert") or ())
    try:
        return True, node_identity(pems[0]) if pems else None
    except ValueError:
        return True, None


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    async def _authorize(
        self, node_id: str, context: grpc.aio.ServicerContext[_Request, _Response]
    ) -> None:
        """A TLS peer may only ask for the node its certificate names. Peers without TLS
        (the Unix socket, or TCP where no certificate was configured) are not checked."""
        over_tls, identity = _peer_node(context)
        if not over_tls or identity == node_id:
            return
        if identity is None:
            reason = (
                f"the client certificate names no node; fix: issue it with the URI SAN "
                f"{XDS_NODE_IDENTITY_PREFIX}<node> (steer certs --node NAME)"
            )
        else:
            reason = (
                f"the client certificate is node {identity}'s; fix: set node.id to "
                f"{identity} (steer envoy --node-id), or use node {node_id}'s certificate"
            )
        log.warning("refused ADS stream for node %s from %s: %s", node_id, context.peer(), reason)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {node_id}: {reason}")

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[_Request],
        context: grpc.aio.ServicerContext[_Request, _Response],
    ) -> AsyncIterator[_Response]:
        async for resp in self._run(request_iterator, context, _SotwStream):
            yield resp

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[_Request],
        context: grpc.aio.ServicerContext[_Request, _Response],
    ) -> AsyncIterator[_Response]:
        async for resp in self._run(request_iterator, context, _DeltaStream):
            yield resp

    async def _run(
        self,
        requests: AsyncIterator[_Request],
        context: grpc.aio.ServicerContext[_Request, _Response],
        make_stream: Callable[[SnapshotCache, str], _Stream],
    ) -> AsyncIterator[_Response]:
        # Requests and snapshot changes arrive independently; funnelling both into one
        # queue lets a single loop own the stream state without locks.
        queue: _Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(requests, queue))]
        stream: _Stream | None = None
        try:
            item = await queue.get()
            if isinstance(item, _Eof | _Changed):
                return
            node_id = item.node.id
            if not node_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the first ADS request must carry node.id (set node.id in the bootstrap)",
                )
            await self._authorize(node_id, context)
            stream = make_stream(self._cache, node_id)
            self._cache.stream_opened(node_id)
            log.info("node %s opened a %s ADS stream from %s", node_id, stream.kind, context.peer())
            # Read before the first request is served, so a snapshot set while it is
            # being handled still wakes the watcher.
            seen = self._cache.generation(node_id)
            tasks.append(asyncio.create_task(self._watch(node_id, seen, queue)))
            while not isinstance(item, _Eof):
                snapshot = self._cache.get(node_id)
                if not isinstance(item, _Changed) and item.node.id not in ("", node_id):
                    # One stream, one node: acking as another node is not a thing.
                    log.warning(
                        "refused ADS request naming node %s on node %s's stream from %s",
                        item.node.id,
                        node_id,
                        context.peer(),
                    )
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"this stream is node {node_id}'s; a request named {item.node.id}",
                    )
                if isinstance(item, _Changed):
                    responses = stream.on_snapshot(snapshot) if snapshot else []
                else:
                    responses = stream.on_request(item, snapshot)
                for resp in responses:
                    yield resp
                item = await queue.get()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if stream is not None:
                self._cache.stream_closed(stream.node_id)
                log.info("node %s closed its %s ADS stream", stream.node_id, stream.kind)

    async def _watch(self, node_id: str, seen: int, queue: _Queue) -> None:
        while True:
            seen = await self._cache.wait_for_change(node_id, seen)
            queue.put_nowait(_CHANGED)


async def _pump(requests: AsyncIterator[_Request], queue: _Queue) -> None:
    try:
        async for req in requests:
            queue.put_nowait(req)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # A client that goes away mid-read is routine (Envoy restarts, drains); it is
        # not worth a traceback.
        log.debug("ADS request stream ended: %r", exc)
    finally:
        queue.put_nowait(_EOF)


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        # Only a leftover socket is ours to remove; anything else is a misconfiguration.
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()


def _file_stamp(tls: XdsServerTls) -> tuple[tuple[int, int], ...]:
    # stat follows symlinks: a Secret volume's atomic swap of ..data changes these.
    return tuple(
        (st.st_mtime_ns, st.st_size)
        for st in (p.stat() for p in (tls.cert, tls.key, tls.client_ca))
    )


def _certificate_configuration(tls: XdsServerTls) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes(),
    )


def server_credentials(tls: XdsServerTls) -> grpc.ServerCredentials:
    """mTLS server credentials that pick up renewed files (a rotated Secret) at the next
    handshake; established streams keep the certificate they were opened with."""
    stamp = _file_stamp(tls)
    initial = _certificate_configuration(tls)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal stamp
        try:
            now = _file_stamp(tls)
            if now == stamp:
                return None
            config = _certificate_configuration(tls)
        except OSError as exc:
            log.warning("xDS certificate not reloaded, keeping the current one: %s", exc)
            return None
        stamp = now
        log.info("xDS serving certificate reloaded from %s", tls.cert)
        return config

    # The stubs say the fetcher returns a configuration; gRPC documents None as "unchanged".
    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]
        require_client_authentication=True,
    )


async def serve(
    cache: SnapshotCache,
    *,
    uds_path: Path | None = None,
    tcp_port: int | None = None,
    tls: XdsServerTls | None = None,
    tcp_host: str = "[::]",
) -> grpc.aio.Server:
    """Start an ADS server on a Unix socket and/or TCP; the caller stops it. With `tls`,
    TCP clients must present a certificate from `tls.client_ca` naming their node."""
    if uds_path is None and tcp_port is None:
        raise ValueError("serve() needs uds_path, tcp_port or both")
    if tls is not None and tcp_port is None:
        raise ValueError("serve(tls=...) needs tcp_port: the Unix socket is not TLS")
    credentials = server_credentials(tls) if tls is not None else None
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ]
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServer(cache), server)
    if uds_path is not None:
        _prepare_socket_path(uds_path)
        server.add_insecure_port(f"unix:{uds_path}")
    if tcp_port is not None and credentials is not None:
        server.add_secure_port(f"{tcp_host}:{tcp_port}", credentials)
    elif tcp_port is not None:
        log.warning(
            "xDS on TCP without TLS: any client that reaches port %d can read every "
            "node's configuration; fix: pass --xds-cert, --xds-key and --xds-client-ca",
            tcp_port,
        )
        server.add_insecure_port(f"{tcp_host}:{tcp_port}")
    await server.start()
    if uds_path is not None:
        # Envoy runs as its own user in the node; group access is what lets it connect.
        uds_path.chmod(0o660)
        log.info("xDS listening on unix:%s", uds_path)
    if tcp_port is not None:
        log.info(
            "xDS listening on %s:%d (%s)",
            tcp_host,
            tcp_port,
            "mutual TLS" if credentials is not None else "plaintext",
        )
    return server
