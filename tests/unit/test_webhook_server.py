"""The webhook server over real TLS, and the certificates it serves."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from steer.constants import (
    CONTROL_SERVICE,
    SYSTEM_NAMESPACE,
    WEBHOOK_MUTATE_PODS_PATH,
    WEBHOOK_VALIDATE_POLICIES_PATH,
)
from steer.control.certs import CertPaths, ca_bundle_b64, dns_names, generate
from steer.control.webhook import (
    MAX_BODY_BYTES,
    build_app,
    kube_namespace_labels,
    serve_webhook,
    ttl_cache,
)

GOLDEN = Path(__file__).parents[1] / "golden" / "admission"
OPTED_IN = {"kubernetes.io/metadata.name": "shop", "steer.dev/inject": "enabled"}


def review(case: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((GOLDEN / f"{case}.request.json").read_text())
    return document


@pytest.fixture
def certs(tmp_path: Path) -> CertPaths:
    return generate(CONTROL_SERVICE, SYSTEM_NAMESPACE, tmp_path / "tls")


@pytest.fixture
async def server(certs: CertPaths) -> AsyncIterator[str]:
    async def namespace_labels(name: str) -> Mapping[str, str]:
        if name == "unreachable":
            raise ConnectionError("API server unreachable")
        return OPTED_IN

    runner = await serve_webhook(build_app(namespace_labels), "127.0.0.1", 0, certs.cert, certs.key)
    try:
        host, port = runner.addresses[0][:2]
        yield f"https://{host}:{port}"
    finally:
        await runner.cleanup()


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


@pytest.fixture
async def client(certs: CertPaths) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=trusting(certs.ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


# --- the server -------------------------------------------------------------------------


async def test_pod_review_is_answered_with_a_patch(
    server: str, client: aiohttp.ClientSession
) -> None:
    sent = review("pod-namespace-opted-in-gets-gate-and-defaults")
    async with client.post(server + WEBHOOK_MUTATE_PODS_PATH, json=sent) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == sent["request"]["uid"]
    assert answer["response"]["allowed"] is True
    assert answer["response"]["patchType"] == "JSONPatch"


async def test_policy_review_is_answered_with_a_refusal(
    server: str, client: aiohttp.ClientSession
) -> None:
    sent = review("policy-bad-regex-is-refused-naming-the-path")
    async with client.post(server + WEBHOOK_VALIDATE_POLICIES_PATH, json=sent) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["response"]["allowed"] is False
    assert "spec.ingress.rules[0].http.paths[1]" in answer["response"]["status"]["message"]


@pytest.mark.parametrize("path", [WEBHOOK_MUTATE_PODS_PATH, WEBHOOK_VALIDATE_POLICIES_PATH])
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"apiVersion": "admission.k8s.io/v1", ', "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request is missing"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1beta1"}).encode(), "admission.k8s.io/v1"),
        (b"[]", "AdmissionReview"),
    ],
)
async def test_bad_bodies_get_400_with_the_reason(
    server: str, client: aiohttp.ClientSession, path: str, body: bytes, reason: str
) -> None:
    async with client.post(
        server + path, data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert reason in (await resp.json())["error"]


async def test_body_over_3_mib_gets_400(server: str, client: aiohttp.ClientSession) -> None:
    sent = review("pod-namespace-opted-in-gets-gate-and-defaults")
    sent["request"]["object"]["metadata"]["annotations"]["padding"] = "x" * MAX_BODY_BYTES
    body = io.BytesIO(json.dumps(sent).encode())  # sized: sent with a Content-Length
    async with client.post(server + WEBHOOK_MUTATE_PODS_PATH, data=body) as resp:
        assert resp.status == 400
        assert "exceeds" in (await resp.json())["error"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: cut off while read
        for _ in range(4):
            yield b" " * (1024 * 1024)

    async with client.post(server + WEBHOOK_MUTATE_PODS_PATH, data=chunked()) as resp:
        assert resp.status == 400
        assert "exceeds" in (await resp.json())["error"]


async def test_a_failing_lookup_gets_500_and_the_server_keeps_serving(
    server: str, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    sent = review("pod-namespace-opted-in-gets-gate-and-defaults")
    sent["request"]["namespace"] = "unreachable"
    async with client.post(server + WEBHOOK_MUTATE_PODS_PATH, json=sent) as resp:
        assert resp.status == 500
        assert "error" in await resp.json()
    assert "API server unreachable" in caplog.text
    async with client.get(server + "/healthz") as resp:
        assert resp.status == 200


async def test_healthz(server: str, client: aiohttp.ClientSession) -> None:
    async with client.get(server + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok\n"


async def test_unknown_paths_and_methods_are_the_routers(
    server: str, client: aiohttp.ClientSession
) -> None:
    async with client.get(server + WEBHOOK_MUTATE_PODS_PATH) as resp:
        assert resp.status == 405
    async with client.post(server + "/mutate", json={}) as resp:
        assert resp.status == 404


async def test_a_client_without_the_ca_refuses_the_server(server: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(server + "/healthz")


@pytest.mark.parametrize("name", dns_names(CONTROL_SERVICE, SYSTEM_NAMESPACE))
async def test_tls_handshake_verifies_each_dns_name(
    server: str, certs: CertPaths, name: str
) -> None:
    # Connect by address, verify as `name`: what the API server does through the Service.
    host, port = server.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(
        host, int(port), ssl=trusting(certs.ca), server_hostname=name
    )
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    writer.close()
    await writer.wait_closed()


async def served_certificate(address: str) -> bytes:
    """The DER certificate a server presents, unverified: to see which one it serves."""
    host, port = address.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    assert der is not None
    return bytes(der)


async def test_a_renewed_certificate_is_served_without_a_restart(
    certs: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_labels(_: str) -> Mapping[str, str]:
        return {}

    app = build_app(no_labels)
    runner = await serve_webhook(app, "127.0.0.1", 0, certs.cert, certs.key, reload_interval=0.01)
    try:
        host, port = runner.addresses[0][:2]
        address = f"https://{host}:{port}"
        first = load(certs.cert).public_bytes(serialization.Encoding.DER)
        assert await served_certificate(address) == first

        # Half-written (or garbage) files: the old certificate keeps serving.
        certs.cert.write_text("not a certificate")
        await asyncio.sleep(0.1)
        assert await served_certificate(address) == first
        assert "not reloaded" in caplog.text

        generate(CONTROL_SERVICE, SYSTEM_NAMESPACE, certs.ca.parent, force=True)
        renewed = load(certs.cert).public_bytes(serialization.Encoding.DER)
        for _ in range(200):
            if await served_certificate(address) == renewed:
                break
            await asyncio.sleep(0.01)
        assert await served_certificate(address) == renewed
    finally:
        await runner.cleanup()


# --- the namespace-label lookup --------------------------------------------------------


async def test_namespace_labels_are_cached_for_the_ttl_and_failures_are_not() -> None:
    now = [100.0]
    reads: list[str] = []

    def read(name: str) -> Mapping[str, str]:
        reads.append(name)
        if name == "gone":
            raise LookupError(name)
        return {"kubernetes.io/metadata.name": name}

    lookup = ttl_cache(read, ttl=5.0, clock=lambda: now[0])
    assert await lookup("shop") == {"kubernetes.io/metadata.name": "shop"}
    now[0] += 4.9
    await lookup("shop")
    assert reads == ["shop"]
    now[0] += 0.2
    await lookup("shop")
    assert reads == ["shop", "shop"]
    for _ in range(2):
        with pytest.raises(LookupError):
            await lookup("gone")
    assert reads.count("gone") == 2


@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG (a real cluster)")
async def test_kube_namespace_labels_reads_the_api_server() -> None:
    from kubernetes import config

    api = config.new_client_from_config(persist_config=False)  # type: ignore[no-untyped-call]
    try:
        labels = await kube_namespace_labels(api)("default")
    finally:
        api.close()
    # Set by the API server on every namespace since Kubernetes 1.21.
    assert labels["kubernetes.io/metadata.name"] == "default"


# --- certificates -------------------------------------------------------------------------


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize(
    "subject",
    [
        *map(DNSName, dns_names(CONTROL_SERVICE, SYSTEM_NAMESPACE)),
        IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    ],
    ids=str,
)
def test_serving_cert_verifies_against_the_ca_for_each_san(
    certs: CertPaths, subject: DNSName | IPAddress
) -> None:
    verifier = PolicyBuilder().store(Store([load(certs.ca)])).build_server_verifier(subject)
    chain = verifier.verify(load(certs.cert), [])
    assert chain[-1] == load(certs.ca)


def test_serving_cert_names_exactly_the_service(certs: CertPaths) -> None:
    sans = load(certs.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == [
        "steer-control",
        "steer-control.steer-system",
        "steer-control.steer-system.svc",
        "steer-control.steer-system.svc.cluster.local",
        "localhost",
    ]
    verifier = PolicyBuilder().store(Store([load(certs.ca)]))
    with pytest.raises(VerificationError, match="no matching subjectAltName"):
        verifier.build_server_verifier(DNSName("steer-control.other.svc")).verify(
            load(certs.cert), []
        )


def test_validity_and_files(certs: CertPaths) -> None:
    cert = load(certs.cert)
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=365)
    assert certs.key.stat().st_mode & 0o777 == 0o600
    # The CA's key is dropped after signing: nothing else can be signed with it.
    assert sorted(p.name for p in certs.ca.parent.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


def test_existing_files_are_not_overwritten_without_force(certs: CertPaths) -> None:
    before = {p: p.read_bytes() for p in (certs.ca, certs.cert, certs.key)}
    with pytest.raises(FileExistsError, match="force"):
        generate(CONTROL_SERVICE, SYSTEM_NAMESPACE, certs.ca.parent)
    assert {p: p.read_bytes() for p in before} == before
    certs.key.chmod(0o644)
    again = generate(CONTROL_SERVICE, SYSTEM_NAMESPACE, certs.ca.parent, force=True)
    assert again == certs
    assert all(p.read_bytes() != data for p, data in before.items())
    assert certs.key.stat().st_mode & 0o777 == 0o600


def test_ca_bundle_is_the_base64_pem(certs: CertPaths) -> None:
    assert base64.b64decode(ca_bundle_b64(certs.ca)) == certs.ca.read_bytes()
    with pytest.raises(ValueError, match="no PEM certificate"):
        ca_bundle_b64(certs.key)
