"""A self-signed CA and a serving certificate for steer's admission webhooks.

The API server calls a webhook only over TLS, checking the serving certificate against the
`caBundle` of the webhook configuration and against the Service's DNS name. This module
makes both for clusters without cert-manager (`docs/webhooks.md`).

The CA's private key is never written: it signs the one serving certificate and is then
dropped, so nothing that reads the output directory can mint other certificates that the
API server would trust for this webhook. Renewing means generating all three files again
and updating the caBundle.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"  # the names a kubernetes.io/tls Secret uses, so one can be mounted
KEY_FILE = "tls.key"
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


def generate(
    service: str, namespace: str, out_dir: Path, days: int = 365, *, force: bool = False
) -> CertPaths:
    """Write ca.crt, tls.crt and tls.key (mode 0600) to out_dir.

    Refuses (FileExistsError) to replace any existing one unless `force`: overwriting a
    serving key that a running webhook or a Secret still uses would break admission.
    """
    if days < 1:
        raise ValueError(f"days={days}: a certificate must be valid for at least one day")
    paths = CertPaths(out_dir / CA_FILE, out_dir / CERT_FILE, out_dir / KEY_FILE)
    existing = [p for p in (paths.ca, paths.cert, paths.key) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; fix: pass force=True "
            "(`--force`) to replace them, or choose another directory"
        )

    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{service} webhook CA")])
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
    return paths


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
