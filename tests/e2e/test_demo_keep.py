"""`steer demo --keep` keeps the node: after the demo process has exited, the control
plane, the agent and Envoy still run and enforce, and `steer lab down` stops them all and
leaves nothing of the lab behind.

The real command line, as an operator runs it. It brings up its own local node, so like
test_demo.py it must not share a run with the `node` fixture. Cleanup runs even when an
assertion fails: the kept processes are killed and the lab and BPF objects removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from steer.constants import CGROUP_SUBTREE, ENVOY_ADMIN_SOCKET
from steer.demo import leftovers
from steer.lab.podproc import PodProcess
from steer.lab.updown import lab_down, lab_status
from steer.lab.wiring import steer_netns_names
from steer.node.bpfobjects import BpfObjects
from steer.node.cgroups import cgroup2_root
from steer.node.envoy import admin_get
from steer.node.kernel import HostKernel
from steer.node.netns import NETNS_RUN_DIR
from tests.e2e.conftest import require_local_node

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]

# What the node runs, by a word of each command line.
NODE_PROCESSES = {
    "control plane": "steer.cli control",
    "agent": "steer.cli agent",
    "Envoy's supervisor": "steer.cli envoy",
    "Envoy": "envoy -c",
}


def steer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def lab_processes() -> dict[int, str]:
    """Every process in the lab's network namespaces or cgroups: where `steer lab down`
    looks for what to kill."""
    pids = {
        pid
        for name, found in pr_netns.ns_pids(str(NETNS_RUN_DIR)).items()
        for pid in found
        if name in steer_netns_names()
    }
    subtree = cgroup2_root() / CGROUP_SUBTREE
    if subtree.is_dir():
        for directory, _dirs, _files in os.walk(subtree):
            with contextlib.suppress(OSError):
                pids |= {int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()}
    return {pid: cmdline(pid) for pid in pids if not gone(pid)}


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing and holds no namespace)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_demo_keep_leaves_a_working_node_that_lab_down_removes() -> None:
    require_local_node()
    seen: dict[int, str] = {}
    try:
        demo = steer("demo", "--keep", "--dataplane", "iptables", "--json", timeout=240)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert json.loads(demo.stdout)["ok"] is True
        assert "steer lab down" in demo.stderr  # how to stop it; stdout stays JSON

        # The demo has exited; its node has not, and every process of it is where
        # `steer lab down` looks.
        seen = lab_processes()
        for what, word in NODE_PROCESSES.items():
            assert any(word in line for line in seen.values()), f"{what} not running: {seen}"

        status = steer("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "agent: running, local" in status.stdout
        assert "default/client" in status.stdout and "default/web" in status.stdout
        assert "control plane: node lab-node" in status.stdout
        assert admin_get("/ready", ENVOY_ADMIN_SOCKET)[0] == 200

        # Still enforcing: Envoy denies web's /admin to the client by policy (no web server
        # needed: the denial comes before any upstream connection).
        lab = lab_status()
        assert lab is not None
        client = lab.pod("default", "client")
        with PodProcess.start(client.netns, client.cgroup) as worker:
            reply = worker.request(lab.pod("default", "web").ip, 8080, "GET", "/admin")
        assert (reply.status, reply.headers.get("server")) == (403, "envoy")

        down = steer("lab", "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert wait_until(lambda: all(gone(pid) for pid in seen), 10), {
            pid: line for pid, line in seen.items() if not gone(pid)
        }
        assert lab_processes() == {}
        assert steer_netns_names() == []
        # The BPF programs and maps go too: nothing is left of the node.
        assert leftovers() == []

        # The agent's status file stays behind; status sees its agent is gone.
        after = steer("status")
        assert after.returncode == 1, after.stdout
        assert "agent: not running" in after.stdout and "fix:" in after.stdout
    finally:
        for pid in {**seen, **lab_processes()}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lab_down()
        BpfObjects.unload_all(HostKernel())
