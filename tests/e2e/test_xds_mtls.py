"""xDS over mutual TLS, and Envoy's admin on a Unix socket. Loopback only, no namespaces.

A bare gRPC client shows what the server accepts: a certificate from steer's CA that names
node A gets node A's snapshot and nothing else; no certificate, or one from another CA,
fails the handshake. Then a real Envoy with the rendered bootstrap connects over mTLS and
ACKs, with its admin reachable only through a mode-0600 socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from steer.control.cache import Snapshot, SnapshotCache
from steer.control.certs import (
    CA_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    KEY_FILE,
    NODES_DIR,
    XDS_CERT_FILE,
    XDS_KEY_FILE,
    generate,
    issue_nodes,
    node_identity,
)
from steer.control.xds import XdsServerTls, serve
from steer.node.envoy import admin_get
from steer.render.bootstrap import AdsMode, XdsClientTls, bootstrap
from steer.render.xds import LISTENER_TYPE
from tests.e2e.test_xds_envoy import free_port, snapshot, stop

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"
NODE_A, NODE_B = "node-a", "node-b"


@dataclass
class Pki:
    dir: Path
    other: Path  # a second, unrelated CA with a node-a certificate of its own

    def node(self, node: str, ca_dir: Path | None = None) -> XdsClientTls:
        directory = (ca_dir or self.dir) / NODES_DIR / node
        return XdsClientTls(directory / CERT_FILE, directory / KEY_FILE, directory / CA_FILE)

    @property
    def server(self) -> XdsServerTls:
        return XdsServerTls(self.dir / XDS_CERT_FILE, self.dir / XDS_KEY_FILE, self.dir / CA_FILE)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    generate("steer-control", "steer-system", tmp_path / "pki", xds=True, nodes=[NODE_A])
    generate("steer-control", "steer-system", tmp_path / "other", nodes=[NODE_A])
    return Pki(tmp_path / "pki", tmp_path / "other")


@dataclass
class Server:
    cache: SnapshotCache
    port: int
    snapshots: dict[str, Snapshot]


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    cache = SnapshotCache()
    snapshots = {}
    for node in (NODE_A, NODE_B):
        snapshots[node] = snapshot(free_port(), free_port())
        cache.set_snapshot(node, snapshots[node])
    port = free_port()
    grpc_server = await serve(cache, tcp_port=port, tls=pki.server, tcp_host="127.0.0.1")
    try:
        yield Server(cache, port, snapshots)
    finally:
        await grpc_server.stop(grace=None)


def credentials(ca: Path, client: XdsClientTls | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes(),
        certificate_chain=client.cert.read_bytes(),
    )


@contextlib.asynccontextmanager
async def ads(
    port: int, creds: grpc.ChannelCredentials
) -> AsyncIterator[ads_pb2_grpc.AggregatedDiscoveryServiceStub]:
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
    try:
        yield ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    finally:
        await channel.close()


def listeners_request(node: str) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=LISTENER_TYPE)


async def first_listeners(
    port: int, creds: grpc.ChannelCredentials, node: str
) -> discovery_pb2.DiscoveryResponse:
    async with ads(port, creds) as stub:
        call = stub.StreamAggregatedResources()
        await call.write(listeners_request(node))
        async with asyncio.timeout(5):
            response = await call.read()
        call.cancel()
        assert response is not grpc.aio.EOF
        return response


# --- certificates -------------------------------------------------------------------------


def test_node_certificates_name_their_node(pki: Pki) -> None:
    assert node_identity(pki.node(NODE_A).cert.read_bytes()) == NODE_A
    # The server's certificate and the webhook's name no node.
    assert node_identity(pki.server.cert.read_bytes()) is None
    assert node_identity((pki.dir / CERT_FILE).read_bytes()) is None
    assert pki.node(NODE_A).key.stat().st_mode & 0o777 == 0o600
    assert not (pki.dir / CA_KEY_FILE).exists(), "the CA key is dropped by default"


def test_nodes_added_later_come_from_the_kept_ca(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    generate("steer-control", "steer-system", out, xds=True, keep_ca_key=True)
    assert (out / CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    [directory] = issue_nodes(out, [NODE_B])
    cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
    ca = x509.load_pem_x509_certificate((out / CA_FILE).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert node_identity(cert.public_bytes(serialization.Encoding.PEM)) == NODE_B
    with pytest.raises(FileExistsError, match="force"):
        issue_nodes(out, [NODE_B])
    with pytest.raises(ValueError, match="node name"):
        issue_nodes(out, ["../escape"])
    with pytest.raises(ValueError, match="--keep-ca-key"):
        issue_nodes(tmp_path / "nothing-here", [NODE_B])


# --- the server, to a bare gRPC client ------------------------------------------------------


async def test_a_node_gets_its_own_snapshot(pki: Pki, server: Server) -> None:
    creds = credentials(pki.dir / CA_FILE, pki.node(NODE_A))
    response = await first_listeners(server.port, creds, NODE_A)
    assert response.version_info == server.snapshots[NODE_A].version(LISTENER_TYPE)
    assert len(response.resources) == 1


async def test_a_node_asking_for_another_node_is_refused(
    pki: Pki, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="steer.xds")
    creds = credentials(pki.dir / CA_FILE, pki.node(NODE_A))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await first_listeners(server.port, creds, NODE_B)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "node-a's" in (refused.value.details() or "")
    assert "refused ADS stream for node node-b" in caplog.text
    # Nothing was pushed to, or recorded for, node B.
    status = server.cache.status(NODE_B)
    assert status.streams == 0
    assert status.pushes == 0


async def test_a_stream_cannot_switch_nodes(pki: Pki, server: Server) -> None:
    creds = credentials(pki.dir / CA_FILE, pki.node(NODE_A))
    async with ads(server.port, creds) as stub:
        call = stub.StreamAggregatedResources()
        await call.write(listeners_request(NODE_A))
        first = await call.read()
        # An ACK in node B's name, on node A's stream.
        await call.write(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=NODE_B),
                type_url=LISTENER_TYPE,
                version_info=first.version_info,
                response_nonce=first.nonce,
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(5):
                await call.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert server.cache.status(NODE_B).acked == {}


async def test_a_certificate_without_a_node_identity_is_refused(
    pki: Pki, server: Server, tmp_path: Path
) -> None:
    # Signed by steer's CA, for client auth, but with no spiffe://steer/node/ URI.
    generate("steer-control", "steer-system", tmp_path / "kept", keep_ca_key=True)
    ca_key = serialization.load_pem_private_key(
        (tmp_path / "kept" / CA_KEY_FILE).read_bytes(), None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "kept" / CA_FILE).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_A)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    # A server trusting that CA for clients: the handshake passes, the identity decides.
    cache = SnapshotCache()
    cache.set_snapshot(NODE_A, server.snapshots[NODE_A])
    port = free_port()
    tls = XdsServerTls(pki.server.cert, pki.server.key, tmp_path / "kept" / CA_FILE)
    grpc_server = await serve(cache, tcp_port=port, tls=tls, tcp_host="127.0.0.1")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(pki.dir / CA_FILE).read_bytes(),
            private_key=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first_listeners(port, creds, NODE_A)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "names no node" in (refused.value.details() or "")
    finally:
        await grpc_server.stop(grace=None)


@pytest.mark.parametrize("client", ["no certificate", "another CA"])
async def test_the_handshake_fails_without_a_certificate_from_steers_ca(
    pki: Pki, server: Server, client: str
) -> None:
    cert = None if client == "no certificate" else pki.node(NODE_A, pki.other)
    creds = credentials(pki.dir / CA_FILE, cert)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await first_listeners(server.port, creds, NODE_A)
    # The TLS handshake fails before any RPC: gRPC reports the channel unavailable.
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.cache.status(NODE_A).streams == 0


async def test_a_renewed_server_certificate_is_served_without_a_restart(
    pki: Pki, server: Server, tmp_path: Path
) -> None:
    # A new CA replaces everything: the old client (old CA) is now refused, the new one served.
    generate("steer-control", "steer-system", pki.dir, xds=True, nodes=[NODE_A], force=True)
    creds = credentials(pki.dir / CA_FILE, pki.node(NODE_A))
    response = await first_listeners(server.port, creds, NODE_A)
    assert response.version_info == server.snapshots[NODE_A].version(LISTENER_TYPE)


async def test_the_unix_socket_is_unchanged(tmp_path: Path) -> None:
    """Local mode: no TLS on the socket, the node id is taken as given."""
    cache = SnapshotCache()
    cache.set_snapshot(NODE_B, snapshot(free_port(), free_port()))
    sock = tmp_path / "xds.sock"
    grpc_server = await serve(cache, uds_path=sock)
    try:
        channel = grpc.aio.insecure_channel(f"unix:{sock}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources()
        await call.write(listeners_request(NODE_B))
        async with asyncio.timeout(5):
            response = await call.read()
        call.cancel()
        await channel.close()
        assert len(response.resources) == 1
        assert sock.stat().st_mode & 0o777 == 0o660
    finally:
        await grpc_server.stop(grace=None)


# --- real Envoy: mTLS to the server, admin on a socket ---------------------------------------


def tcp_listen_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from its fds and /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.envoy
@pytest.mark.skipif(not os.access(ENVOY, os.X_OK), reason="no envoy binary")
@pytest.mark.parametrize("ads_mode", ["sotw", "delta"])
async def test_envoy_connects_over_mtls_and_its_admin_is_a_private_socket(
    pki: Pki, server: Server, tmp_path: Path, ads_mode: AdsMode
) -> None:
    admin = tmp_path / "admin.sock"
    config = tmp_path / "envoy.json"
    document = bootstrap(
        NODE_A,
        xds_address=("127.0.0.1", server.port),
        ads=ads_mode,
        admin=admin,
        xds_tls=pki.node(NODE_A),
    )
    config.write_text(json.dumps(document))
    log = tmp_path / "envoy.log"
    with log.open("wb") as log_fd:
        proc = subprocess.Popen(
            [
                str(ENVOY), "-c", str(config),
                "--base-id", str(random.randrange(1, 2**31)),
                "--disable-hot-restart", "--concurrency", "1", "--log-level", "info",
            ],
            stdout=log_fd,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-30:])

    try:
        async with asyncio.timeout(15):
            status = await server.cache.wait_for_ack(NODE_A)
        want = server.snapshots[NODE_A]
        assert status.acked[LISTENER_TYPE] == want.version(LISTENER_TYPE), tail()
        assert server.cache.status(NODE_B).streams == 0

        deadline = time.monotonic() + 10
        while True:
            try:
                code, body = await asyncio.to_thread(admin_get, "/ready", admin)
            except OSError:
                code, body = 0, ""
            if code == 200:
                break
            assert proc.poll() is None, tail()
            assert time.monotonic() < deadline, f"not ready ({code} {body!r}):\n{tail()}"
            await asyncio.sleep(0.1)
        assert body.strip() == "LIVE"
        # Stats stay within reach of tests, through the socket.
        code, stats = await asyncio.to_thread(
            admin_get, "/stats?filter=^cluster.steer-xds.ssl.handshake$", admin
        )
        assert code == 200
        assert int(stats.split(":")[1]) >= 1, stats

        assert admin.stat().st_mode & 0o777 == 0o600
        # The only TCP port Envoy listens on is the listener xDS gave it: no admin port.
        listener_port = json.loads(
            (await asyncio.to_thread(admin_get, "/listeners?format=json", admin))[1]
        )["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        assert tcp_listen_ports(proc.pid) == {listener_port}
    finally:
        await stop(proc)
