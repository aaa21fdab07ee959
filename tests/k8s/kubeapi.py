"""A real kube-apiserver, with its own etcd, on loopback for integration tests.

The binary is built once per machine by `make kube-apiserver` (scripts/kube-apiserver.sh)
into a cache outside the repo; etcd comes from Debian's etcd-server. There is no
controller-manager, scheduler or kubelet: pods stay Pending and deleted namespaces stay
Terminating (nothing removes their finalizer), but the API itself is the real one: watches,
CRDs with a status subresource, RBAC, admission webhooks by `url:`.

Auth is one static token in system:masters. Both processes log to files in the workdir,
which is left in place (minus etcd's data) for debugging.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from steer.lab.process import supervised
from tests import waiting

KUBE_VERSION = "v1.20.2"
DEFAULT_CACHE = Path("/var/cache/steer/kube")
BUILD_HINT = "run `make kube-apiserver` to build one (about 12 minutes)"


@dataclass(frozen=True)
class ApiServer:
    kubeconfig: Path
    url: str
    token: str
    version: str


class ApiServerError(RuntimeError):
    """The apiserver or its etcd did not come up; the message ends with their log tails."""


def cache_dir() -> Path:
    """Where scripts/kube-apiserver.sh puts the binary (STEER_KUBE_CACHE overrides)."""
    root = os.environ.get("STEER_KUBE_CACHE") or DEFAULT_CACHE
    return Path(root) / KUBE_VERSION


def cached_apiserver() -> Path | None:
    """The built kube-apiserver binary, or None if `make kube-apiserver` has not run here."""
    binary = cache_dir() / "kube-apiserver"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports. All are held open until every one is picked, so they
    differ; another process could still take one before our servers bind it (unlikely)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path.name})"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def _get(url: str, context: ssl.SSLContext | None, token: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    response: IO[bytes]
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        return response.read()


def _wait_until(
    what: str,
    url: str,
    procs: list[tuple[str, subprocess.Popen[bytes], Path]],
    *,
    timeout: float,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> None:
    """Poll url until it answers 200; fail early if one of procs has exited."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        for name, proc, log_path in procs:
            if proc.poll() is not None:
                raise ApiServerError(
                    f"{name} exited with {proc.returncode} while waiting for {what}\n"
                    + _tail(log_path)
                )
        try:
            _get(url, context, token)
            return
        except OSError as exc:  # URLError and HTTPError (e.g. 500 from /readyz) are OSErrors
            last_error = str(exc)
        if time.monotonic() > deadline:
            tails = "\n".join(_tail(log_path) for _, _, log_path in procs)
            raise ApiServerError(f"{what} not ready after {timeout:.0f}s: {last_error}\n{tails}")
        time.sleep(0.25)


def _write_service_account_key(path: Path) -> None:
    # 1.20 requires a signing key for service account tokens even when nothing issues them.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _verifies(url: str, ca_file: Path) -> bool:
    """Whether the serving cert checks out against ca_file for this URL's host."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
        _get(f"{url}/version", context)
    except OSError:  # also ssl.SSLError and urllib's URLError
        return False
    return True


def _write_kubeconfig(path: Path, url: str, token: str, ca_file: Path | None) -> None:
    cluster: dict[str, object] = {"server": url}
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file)
    else:
        cluster["insecure-skip-tls-verify"] = True
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "steer-test", "cluster": cluster}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "steer-test", "context": {"cluster": "steer-test", "user": "admin"}}],
        "current-context": "steer-test",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


@contextmanager
def running_apiserver(
    workdir: Path,
    *,
    binary: Path | None = None,
    etcd: str | None = None,
    timeout: float = 90.0,
) -> Iterator[ApiServer]:
    """Start etcd and kube-apiserver on free loopback ports, yield once /readyz answers.

    Both processes are stopped on exit, also when the body raised; etcd's data dir is
    removed, the logs (etcd.log, kube-apiserver.log) stay in workdir. If the calling process
    is killed outright, the kernel stops them too; as that signal follows the thread that
    started them, enter this on a thread that outlives the servers (e.g. the main thread).
    The kubeconfig verifies the apiserver's self-signed cert; only if that fails does it
    skip verification (and urllib3 then warns on every request).
    """
    binary = binary or cached_apiserver()
    if binary is None:
        raise ApiServerError(f"no kube-apiserver in {cache_dir()}: {BUILD_HINT}")
    etcd = etcd or shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(etcd).exists():
        raise ApiServerError(f"no etcd binary (Debian's etcd-server): {BUILD_HINT}")

    workdir.mkdir(parents=True, exist_ok=True)
    etcd_data = workdir / "etcd-data"
    cert_dir = workdir / "certs"
    # A fresh cluster every time, even in a reused workdir.
    for stale in (etcd_data, cert_dir):
        shutil.rmtree(stale, ignore_errors=True)
    cert_dir.mkdir()
    token = os.urandom(16).hex()
    tokens = workdir / "tokens.csv"
    # token,user,uid,"groups": system:masters is bound to cluster-admin by RBAC's bootstrap.
    tokens.write_text(f'{token},steer-admin,steer-admin,"system:masters"\n')
    tokens.chmod(0o600)
    sa_key = workdir / "service-account.key"
    _write_service_account_key(sa_key)
    client_port, peer_port, secure_port = _free_ports(3)
    etcd_url = f"http://127.0.0.1:{client_port}"
    url = f"https://127.0.0.1:{secure_port}"

    etcd_args = [
        etcd,
        "--name=steer-test",
        f"--data-dir={etcd_data}",
        f"--listen-client-urls={etcd_url}",
        f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
        f"--initial-cluster=steer-test=http://127.0.0.1:{peer_port}",
        "--initial-cluster-state=new",
        "--logger=zap",
    ]
    apiserver_args = [
        str(binary),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        # Nothing here is reachable off loopback, so advertise loopback too; it is also the
        # host the self-signed serving cert is made for.
        "--advertise-address=127.0.0.1",
        f"--secure-port={secure_port}",
        # 1.20 still opens an unauthenticated port 8080 unless told not to.
        "--insecure-port=0",
        f"--cert-dir={cert_dir}",
        f"--token-auth-file={tokens}",
        "--authorization-mode=RBAC",
        # No controller-manager and no nodes: nobody reaches the in-cluster `kubernetes`
        # service, so its endpoints are not maintained; and no namespace ever gets its
        # `default` service account, which the ServiceAccount plugin demands of every pod.
        "--endpoint-reconciler-type=none",
        "--disable-admission-plugins=ServiceAccount",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-signing-key-file={sa_key}",
        f"--service-account-key-file={sa_key}",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--profiling=false",
    ]
    etcd_log = workdir / "etcd.log"
    apiserver_log = workdir / "kube-apiserver.log"
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        with ExitStack() as stack:
            etcd_proc = stack.enter_context(supervised(etcd_args, etcd_log, stop_timeout=15))
            procs = [("etcd", etcd_proc, etcd_log)]
            _wait_until("etcd", f"{etcd_url}/health", procs, timeout=timeout)
            apiserver_proc = stack.enter_context(
                supervised(apiserver_args, apiserver_log, stop_timeout=15)
            )
            procs.append(("kube-apiserver", apiserver_proc, apiserver_log))
            _wait_until(
                "kube-apiserver",
                f"{url}/readyz",
                procs,
                timeout=timeout,
                context=insecure,
                token=token,
            )
            version = str(json.loads(_get(f"{url}/version", insecure, token))["gitVersion"])
            # The apiserver writes its self-signed cert (and the CA that signed it) here.
            ca_file = cert_dir / "apiserver.crt"
            kubeconfig = workdir / "kubeconfig"
            _write_kubeconfig(kubeconfig, url, token, ca_file if _verifies(url, ca_file) else None)
            yield ApiServer(kubeconfig=kubeconfig, url=url, token=token, version=version)
    finally:
        shutil.rmtree(etcd_data, ignore_errors=True)


def eventually(
    check: Callable[[], Any], what: str, timeout: float = 30, interval: float = 0.2
) -> Any:
    """tests.waiting.eventually, where API errors count as not yet (the object may not
    exist yet)."""
    from kubernetes.client.rest import ApiException

    return waiting.eventually(check, what, timeout, interval=interval, not_yet=(ApiException,))
