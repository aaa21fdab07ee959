"""The ADS server over real gRPC: first against a bare gRPC client, then a real Envoy.

The bare-client tests pin protocol details Envoy does not let a test provoke at will
(stale nonces, a missing node id, removals in delta). The Envoy tests show the whole
loop: snapshot -> ADS -> Envoy -> traffic, plus ACK/NACK bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from steer.constants import ENVOY_CLUSTER_ID
from steer.control.cache import (
    PushRejected,
    Snapshot,
    SnapshotCache,
)
from steer.control.xds import serve
from steer.render.bootstrap import AdsMode, bootstrap
from steer.render.xds import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from tests.xds_builders import loopback, static_cluster

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"
NODE = "test-node"
BACKEND_BODY = b"hello from backend"

# --- resources ------------------------------------------------------------------------------


def _any(msg: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def to_cluster(prefix: str, cluster: str) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=route_components_pb2.RouteAction(cluster=cluster),
    )


def deny(path: str) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(path=path),
        direct_response=route_components_pb2.DirectResponseAction(status=403),
    )


def bad_regex() -> route_components_pb2.Route:
    # Passes protobuf validation and our consistency check; only Envoy compiling the
    # RE2 pattern finds it broken, so Envoy must NACK the RouteConfiguration.
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex="(")),
        direct_response=route_components_pb2.DirectResponseAction(status=418),
    )


def route_config(name: str, *routes: route_components_pb2.Route) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="all", domains=["*"], routes=list(routes))
        ],
    )


def http_listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(
            route_config_name=route_name,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=loopback(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm),
                    )
                ]
            )
        ],
    )


def snapshot(listen_port: int, backend_port: int, *routes: Any) -> Snapshot:
    return Snapshot.of(
        static_cluster("backend", backend_port),
        route_config("r1", *(routes or (to_cluster("/", "backend"),))),
        http_listener("l1", listen_port, "r1"),
    )


# --- fixtures -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream pool expects

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BACKEND_BODY)))
        self.end_headers()
        self.wfile.write(BACKEND_BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backend_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Xds:
    cache: SnapshotCache
    socket: Path


@pytest.fixture
async def xds(tmp_path: Path) -> AsyncIterator[Xds]:
    sock = tmp_path / "run" / "xds.sock"
    # sun_path holds 108 bytes; pytest's tmp_path is well below, but fail clearly if not.
    assert len(str(sock)) < 100, sock
    cache = SnapshotCache()
    server = await serve(cache, uds_path=sock)
    try:
        yield Xds(cache, sock)
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def ads_channel(sock: Path) -> AsyncIterator[ads_pb2_grpc.AggregatedDiscoveryServiceStub]:
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    try:
        yield ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    finally:
        await channel.close(grace=None)


class Client:
    """A scripted ADS client: writes requests, collects responses in the background."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for resp in self.call:
                self.responses.put_nowait(resp)

    async def send(self, req: Any) -> None:
        await self.call.write(req)

    async def next(self, timeout: float = 5) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing_for(self, seconds: float = 0.3) -> None:
        await asyncio.sleep(seconds)
        assert self.responses.empty(), self.responses.get_nowait()

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def node() -> base_pb2.Node:
    return base_pb2.Node(id=NODE, cluster=ENVOY_CLUSTER_ID)


_MESSAGES = {
    LISTENER_TYPE: listener_pb2.Listener,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
    CLUSTER_TYPE: cluster_pb2.Cluster,
}


def names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for packed in resp.resources:
        msg = _MESSAGES[resp.type_url]()
        packed.Unpack(msg)
        out.append(msg.name)
    return out


# --- bare gRPC client -----------------------------------------------------------------------


async def test_stream_without_node_id_is_rejected(xds: Xds) -> None:
    async with ads_channel(xds.socket) as stub:
        call = stub.StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(type_url=LISTENER_TYPE))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in (err.value.details() or "")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_stream_opened_before_any_snapshot_gets_the_first_one(xds: Xds, delta: bool) -> None:
    async with ads_channel(xds.socket) as stub:
        if delta:
            client = Client(stub.DeltaAggregatedResources())
            request: Any = discovery_pb2.DeltaDiscoveryRequest
        else:
            client = Client(stub.StreamAggregatedResources())
            request = discovery_pb2.DiscoveryRequest
        await client.send(request(node=node(), type_url=CLUSTER_TYPE))
        try:
            await client.nothing_for()
            xds.cache.set_snapshot(NODE, Snapshot.of(static_cluster("a", 1)))
            resp = await client.next()
            assert resp.type_url == CLUSTER_TYPE
            assert len(resp.resources) == 1
        finally:
            await client.close()


async def test_sotw_acks_nacks_and_stale_nonces(xds: Xds) -> None:
    snap = snapshot(1, 2)
    xds.cache.set_snapshot(NODE, snap)
    async with ads_channel(xds.socket) as stub:
        client = Client(stub.StreamAggregatedResources())
        try:
            await client.send(discovery_pb2.DiscoveryRequest(node=node(), type_url=CLUSTER_TYPE))
            cds = await client.next()
            assert cds.version_info == snap.version(CLUSTER_TYPE)
            assert names(cds) == ["backend"]
            assert xds.cache.status(NODE).streams == 1

            await client.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=ROUTE_TYPE, resource_names=["r1", "not-there"]
                )
            )
            rds = await client.next()
            assert names(rds) == ["r1"]

            await client.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=CLUSTER_TYPE, version_info=cds.version_info, response_nonce=cds.nonce
                )
            )
            await client.nothing_for()
            assert xds.cache.status(NODE).acked == {CLUSTER_TYPE: cds.version_info}

            # A NACK: the same version must not come back until the snapshot changes.
            await client.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=ROUTE_TYPE,
                    resource_names=["r1", "not-there"],
                    response_nonce=rds.nonce,
                    error_detail=status_pb2.Status(code=3, message="no thanks"),
                )
            )
            await client.nothing_for()
            status = xds.cache.status(NODE)
            assert status.last_nack is not None
            assert status.last_nack.detail == "no thanks"
            assert status.last_nack.version == snap.version(ROUTE_TYPE)

            changed = snapshot(1, 3)  # only the cluster moves
            xds.cache.set_snapshot(NODE, changed)
            cds2 = await client.next()
            assert cds2.type_url == CLUSTER_TYPE
            assert cds2.version_info == changed.version(CLUSTER_TYPE)
            await client.nothing_for()  # RDS content is unchanged: nothing to resend

            # Answering the first CDS response now is stale: a newer one is out.
            await client.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=CLUSTER_TYPE,
                    version_info=cds.version_info,
                    response_nonce=cds.nonce,
                    error_detail=status_pb2.Status(code=3, message="stale"),
                )
            )
            await client.nothing_for()
            assert xds.cache.status(NODE).nacks == 1
        finally:
            await client.close()
    await asyncio.sleep(0.1)
    assert xds.cache.status(NODE).streams == 0


async def test_sotw_pushes_changed_types_in_make_before_break_order(xds: Xds) -> None:
    xds.cache.set_snapshot(NODE, snapshot(1, 2))
    async with ads_channel(xds.socket) as stub:
        client = Client(stub.StreamAggregatedResources())
        try:
            # Subscribe in the "wrong" order on purpose.
            for type_url, wanted in ((ROUTE_TYPE, ["r1"]), (LISTENER_TYPE, []), (CLUSTER_TYPE, [])):
                first = type_url == ROUTE_TYPE
                await client.send(
                    discovery_pb2.DiscoveryRequest(
                        node=node() if first else None, type_url=type_url, resource_names=wanted
                    )
                )
                await client.next()
            new = snapshot(5, 6, deny("/x"), to_cluster("/", "backend"))
            xds.cache.set_snapshot(NODE, new)
            order = [(await client.next()).type_url for _ in range(3)]
            assert order == [CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE]
        finally:
            await client.close()


async def test_delta_sends_only_changes_and_removals(xds: Xds) -> None:
    first = Snapshot.of(static_cluster("a", 1), static_cluster("b", 2))
    xds.cache.set_snapshot(NODE, first)
    async with ads_channel(xds.socket) as stub:
        client = Client(stub.DeltaAggregatedResources())
        try:
            await client.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    node=node(),
                    type_url=CLUSTER_TYPE,
                    # The client already holds the current "a" from an earlier stream.
                    initial_resource_versions={"a": first.resource_version(CLUSTER_TYPE, "a")},
                )
            )
            resp = await client.next()
            assert [r.name for r in resp.resources] == ["b"]
            assert resp.resources[0].version == first.resource_version(CLUSTER_TYPE, "b")
            assert resp.system_version_info == first.version(CLUSTER_TYPE)
            await client.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=CLUSTER_TYPE, response_nonce=resp.nonce
                )
            )
            await client.nothing_for()
            assert xds.cache.status(NODE).acked == {CLUSTER_TYPE: first.version(CLUSTER_TYPE)}

            second = Snapshot.of(static_cluster("a", 9), static_cluster("c", 3))
            xds.cache.set_snapshot(NODE, second)
            resp = await client.next()
            assert [r.name for r in resp.resources] == ["a", "c"]
            assert list(resp.removed_resources) == ["b"]

            # NACK: nothing is resent until the snapshot changes again...
            await client.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=CLUSTER_TYPE,
                    response_nonce=resp.nonce,
                    error_detail=status_pb2.Status(code=3, message="bad c"),
                )
            )
            await client.nothing_for()
            # ...and then what was rejected goes out again even if only "a" changed,
            # because the client kept its old copies.
            third = Snapshot.of(static_cluster("a", 10), static_cluster("c", 3))
            xds.cache.set_snapshot(NODE, third)
            resp = await client.next()
            assert [r.name for r in resp.resources] == ["a", "c"]
            assert not resp.removed_resources
        finally:
            await client.close()


# --- real Envoy -----------------------------------------------------------------------------


@dataclass
class Envoy:
    proc: subprocess.Popen[bytes]
    admin: str
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _admin_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


async def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it takes longer than 5 s; without blocking the loop."""
    proc.terminate()
    try:
        await asyncio.to_thread(proc.wait, 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait, 5)


@contextlib.asynccontextmanager
async def run_envoy(tmp_path: Path, sock: Path, ads: AdsMode) -> AsyncIterator[Envoy]:
    config = tmp_path / "envoy.json"
    # Port 0 plus --admin-address-path: no race for a free port between Envoys.
    config.write_text(json.dumps(bootstrap(NODE, xds_socket=sock, ads=ads, admin=0)))
    admin_file = tmp_path / "admin.address"
    log = tmp_path / "envoy.log"
    with log.open("wb") as log_fd:
        proc = subprocess.Popen(
            [
                str(ENVOY),
                "-c", str(config),
                "--admin-address-path", str(admin_file),
                # Distinct base ids keep parallel Envoys' shared-memory names apart.
                "--base-id", str(random.randrange(1, 2**31)),
                "--disable-hot-restart",
                "--concurrency", "1",
                "--log-level", "info",
            ],
            stdout=log_fd,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    envoy = Envoy(proc, "", log)
    try:
        deadline = time.monotonic() + 15
        while not admin_file.exists() or not admin_file.read_text().strip():
            assert proc.poll() is None, f"envoy exited early:\n{envoy.log_tail()}"
            assert time.monotonic() < deadline, f"no admin address:\n{envoy.log_tail()}"
            await asyncio.sleep(0.05)
        envoy.admin = "http://" + admin_file.read_text().strip()
        yield envoy
    finally:
        await stop(proc)


async def wait_ready(envoy: Envoy, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await asyncio.to_thread(_admin_get, envoy.admin + "/ready")
        if code == 200:
            return
        assert envoy.proc.poll() is None, f"envoy exited:\n{envoy.log_tail()}"
        assert time.monotonic() < deadline, f"not ready ({code} {body!r}):\n{envoy.log_tail()}"
        await asyncio.sleep(0.1)


class KeepAlive:
    """One HTTP/1.1 connection reused for every request, to show updates need no reconnect."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.local: Any = None

    def _get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        local = self.conn.sock.getsockname()
        if self.local is None:
            self.local = local
        assert local == self.local, "the connection was re-established"
        return resp.status, body

    async def get(self, path: str) -> tuple[int, bytes]:
        return await asyncio.to_thread(self._get, path)

    async def until(self, path: str, status: int, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            got, body = await self.get(path)
            if got == status:
                return body
            assert time.monotonic() < deadline, f"{path}: still {got}, wanted {status}"
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self.conn.close()


async def first_response(port: int, timeout: float = 10) -> None:
    """Wait until the listener answers at all (it may still be warming after /ready)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            await asyncio.to_thread(probe.request, "GET", "/")
            resp = await asyncio.to_thread(probe.getresponse)
            await asyncio.to_thread(resp.read)
            if resp.status == 200:
                return
        except OSError:
            pass
        finally:
            probe.close()
        assert time.monotonic() < deadline, "listener never served 200"
        await asyncio.sleep(0.1)


@pytest.mark.envoy
@pytest.mark.skipif(not os.access(ENVOY, os.X_OK), reason="no envoy binary")
@pytest.mark.parametrize("ads", ["sotw", "delta"])
async def test_envoy_follows_snapshots_and_survives_a_nack(
    xds: Xds, backend_port: int, tmp_path: Path, ads: AdsMode
) -> None:
    listen = free_port()
    good = snapshot(listen, backend_port)
    xds.cache.set_snapshot(NODE, good)

    async with run_envoy(tmp_path, xds.socket, ads) as envoy:
        await wait_ready(envoy)
        async with asyncio.timeout(10):
            status = await xds.cache.wait_for_ack(NODE)
        for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE):
            assert status.acked[type_url] == good.version(type_url)
        assert status.streams == 1
        assert status.nacks == 0

        await first_response(listen)
        client = KeepAlive(listen)
        try:
            assert await client.until("/", 200) == BACKEND_BODY

            # A route change arrives over RDS and applies to the open connection.
            denying = snapshot(listen, backend_port, deny("/deny"), to_cluster("/", "backend"))
            assert xds.cache.set_snapshot(NODE, denying)
            await client.until("/deny", 403)
            assert await client.until("/", 200) == BACKEND_BODY
            async with asyncio.timeout(10):
                await xds.cache.wait_for_ack(NODE)

            # Envoy refuses the broken regex; it must keep running the last good routes.
            broken = snapshot(
                listen, backend_port, bad_regex(), deny("/deny"), to_cluster("/", "backend")
            )
            assert xds.cache.set_snapshot(NODE, broken)
            with pytest.raises(PushRejected) as rejected:
                async with asyncio.timeout(10):
                    await xds.cache.wait_for_ack(NODE)
            nack = rejected.value.nack
            assert nack.type_url == ROUTE_TYPE
            assert nack.version == broken.version(ROUTE_TYPE)
            assert nack.detail.strip(), "Envoy's NACK should say what is wrong"
            status = xds.cache.status(NODE)
            assert status.acked[ROUTE_TYPE] == denying.version(ROUTE_TYPE)
            assert status.nacks == 1

            assert await client.until("/", 200) == BACKEND_BODY
            await client.until("/deny", 403)
            # The rejected version is not pushed again and again.
            pushes = xds.cache.status(NODE).pushes
            await asyncio.sleep(1)
            assert xds.cache.status(NODE).pushes == pushes

            # A fixed snapshot goes through and is acked again.
            fixed = snapshot(listen, backend_port, to_cluster("/", "backend"))
            assert xds.cache.set_snapshot(NODE, fixed)
            async with asyncio.timeout(10):
                await xds.cache.wait_for_ack(NODE)
            assert await client.until("/deny", 200) == BACKEND_BODY
        finally:
            client.close()
