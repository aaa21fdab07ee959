"""A self-signed CA and a serving certificate for steer's admission webhooks, and the
certificates of xDS over mutual TLS.

The API server calls a webhook only over TLS, checking the serving certificate against the
`caBundle` of the webhook configuration and against the Service's DNS name. This module
makes both for clusters without cert-manager (`docs/webhooks.md`).

By default the CA's private key is never written: it signs the certificates of this run
and is then dropped, so nothing that reads the output directory can mint other
certificates that the API server (or the xDS server) would trust. Renewing means
generating the files again and updating the caBundle. `keep_ca_key` writes it (mode 0600)
so that certificates for nodes added later can be issued from the same CA (`issue_nodes`).

From the same CA, on request: the xDS server's certificate (`xds.crt`, `xds.key`, for the
same Service names) and one client certificate per node (`nodes/<node>/`), whose identity
is the URI SAN `spiffe://steer/node/<node>` (`node_identity` reads it back).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from steer.constants import XDS_NODE_IDENTITY_PREFIX

CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CERT_FILE = "tls.crt"  # the names a kubernetes.io/tls Secret uses, so one can be mounted
KEY_FILE = "tls.key"
XDS_CERT_FILE = "xds.crt"
XDS_KEY_FILE = "xds.key"
NODES_DIR = "nodes"
# A node name is a DNS subdomain (RFC 1123), which is also safe as a directory name.
_NODE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
# Certificates are valid from a little before now: a node whose clock runs behind the
# generating machine's would otherwise refuse them for a while.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    ca: Path
    cert: Path
    key: Path


def dns_names(service: str, namespace: str) -> list[str]:
    """Every name the webhook may be reached by: in-cluster forms of the Service's name,
    then localhost for a webhook run beside a local API server or in tests."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        "localhost",
    ]


def node_identity_uri(node: str) -> str:
    return f"{XDS_NODE_IDENTITY_PREFIX}{node}"


def node_identity(pem: bytes) -> str | None:
    """The node a client certificate names (its one `spiffe://steer/node/<node>` URI SAN),
    or None when it names none or several."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    nodes = [
        uri[len(XDS_NODE_IDENTITY_PREFIX) :]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(XDS_NODE_IDENTITY_PREFIX)
    ]
    return nodes[0] if len(nodes) == 1 and nodes[0] else None


def check_node_name(node: str) -> str:
    if not node or not set(node) <= _NODE_NAME_CHARS or node.startswith((".", "-")):
        raise ValueError(
            f"node name {node!r}: want a Kubernetes node name (lowercase letters, digits, "
            "'-' and '.'); fix: pass the name `kubectl get nodes` shows"
        )
    return node


def generate(
    service: str,
    namespace: str,
    out_dir: Path,
    days: int = 365,
    *,
    force: bool = False,
    xds: bool = False,
    nodes: Sequence[str] = (),
    keep_ca_key: bool = False,
) -> CertPaths:
    """Write ca.crt, tls.crt and tls.key (mode 0600) to out_dir; with `xds`, also the xDS
    server's xds.crt and xds.key; for each of `nodes`, nodes/<node>/{tls.crt,tls.key,ca.crt};
    with `keep_ca_key`, ca.key.

    Refuses (FileExistsError) to replace any existing one unless `force`: overwriting a
    serving key that a running webhook or a Secret still uses would break admission.
    """
    if days < 1:
        raise ValueError(f"days={days}: a certificate must be valid for at least one day")
    for node in nodes:
        check_node_name(node)
    paths = CertPaths(out_dir / CA_FILE, out_dir / CERT_FILE, out_dir / KEY_FILE)
    planned = [paths.ca, paths.cert, paths.key]
    if xds:
        planned += [out_dir / XDS_CERT_FILE, out_dir / XDS_KEY_FILE]
    if keep_ca_key:
        planned.append(out_dir / CA_KEY_FILE)
    for node in nodes:
        planned += _node_paths(out_dir, node)
    existing = [p for p in planned if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; fix: pass force=True "
            "(`--force`) to replace them, or choose another directory"
        )

    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{service} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs leaf certificates only.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names = dns_names(service, namespace)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *map(x509.DNSName, names),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(paths.ca, ca_cert.public_bytes(pem), 0o644, replace=force)
    _write(paths.cert, cert.public_bytes(pem), 0o644, replace=force)
    _write(paths.key, key_pem, 0o600, replace=force)
    if xds:
        # Its own key, so the webhook's and the xDS server's can be rotated (and leak)
        # independently; the same names, as Envoy dials the same Service.
        xds_key = ec.generate_private_key(ec.SECP256R1())
        xds_cert = _leaf(
            ca_cert, ca_key, xds_key, names[2], days, server=True, dns=names, ip="127.0.0.1"
        )
        _write(out_dir / XDS_CERT_FILE, xds_cert.public_bytes(pem), 0o644, replace=force)
        _write(out_dir / XDS_KEY_FILE, _key_pem(xds_key), 0o600, replace=force)
    if keep_ca_key:
        _write(out_dir / CA_KEY_FILE, _key_pem(ca_key), 0o600, replace=force)
    _write_nodes(ca_cert, ca_key, nodes, out_dir, days, force=force)
    return paths


def issue_nodes(
    ca_dir: Path, nodes: Sequence[str], days: int = 365, *, force: bool = False
) -> list[Path]:
    """Client certificates for `nodes` from the CA kept in ca_dir (ca.crt and ca.key, as
    `generate(keep_ca_key=True)` writes them), into ca_dir/nodes/<node>/. Returns the
    node directories."""
    if days < 1:
        raise ValueError(f"days={days}: a certificate must be valid for at least one day")
    for node in nodes:
        check_node_name(node)
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_FILE).read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no usable CA in {ca_dir} ({exc}); fix: generate one with --keep-ca-key, "
            f"which writes {CA_FILE} and {CA_KEY_FILE} there"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY_FILE}: not an EC key; fix: use a CA steer made")
    planned = [p for node in nodes for p in _node_paths(ca_dir, node)]
    existing = [p for p in planned if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; fix: pass force=True "
            "(`--force`) to replace them"
        )
    _write_nodes(ca_cert, ca_key, nodes, ca_dir, days, force=force)
    return [ca_dir / NODES_DIR / node for node in nodes]


def _node_paths(out_dir: Path, node: str) -> list[Path]:
    directory = out_dir / NODES_DIR / node
    return [directory / CERT_FILE, directory / KEY_FILE, directory / CA_FILE]


def _write_nodes(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    nodes: Sequence[str],
    out_dir: Path,
    days: int,
    *,
    force: bool,
) -> None:
    """nodes/<node>/: the node's client certificate and key, and the CA that Envoy checks
    the xDS server against: the directory to copy to the node, as it is."""
    pem = serialization.Encoding.PEM
    for node in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(ca_cert, ca_key, key, node, days, server=False, uri=node_identity_uri(node))
        cert_path, key_path, ca_path = _node_paths(out_dir, node)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        _write(cert_path, cert.public_bytes(pem), 0o644, replace=force)
        _write(key_path, _key_pem(key), 0o600, replace=force)
        _write(ca_path, ca_cert.public_bytes(pem), 0o644, replace=force)


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    days: int,
    *,
    server: bool,
    dns: Sequence[str] = (),
    ip: str | None = None,
    uri: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    if ip is not None:
        sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    if uri is not None:
        sans.append(x509.UniformResourceIdentifier(uri))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # An ECDSA serving key only signs the TLS handshake (digital_signature); a CA key only
    # signs certificates and CRLs.
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    # Created afresh with O_EXCL and its final mode: the key is never readable by others,
    # not even for an instant, and a symlink planted at the path is replaced, not followed.
    # Without `replace`, a file that appeared since the check above makes this fail.
    if replace:
        with suppress(FileNotFoundError):
            path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        # The umask may have narrowed `mode`; set exactly what was asked for.
        os.fchmod(f.fileno(), mode)
        f.write(data)


def ca_bundle_b64(path: Path) -> str:
    """The `caBundle` of a webhook configuration: the CA's PEM, base64-encoded.

    Checked to hold at least one certificate, so a wrong file fails here rather than as
    TLS errors in the API server's log.
    """
    pem = path.read_bytes()
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{path} holds no PEM certificate ({exc})") from None
    return base64.b64encode(pem).decode()
