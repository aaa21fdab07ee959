"""The agent and `steer envoy` run as PID 1 of their containers, which the kernel gives no
default action for SIGTERM: they must stop on it themselves, or every pod delete waits
out the grace period and ends in SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.privileged

# As steer's entry points do: install the handler, then loop until it says stop.
PID1 = """
import sys, threading
from steer.cli import _stop_on_sigterm
stop = {install}
print("ready", flush=True)
sys.exit(0 if stop.wait(60) else 3)
"""


def _as_pid1(install: bool) -> subprocess.Popen[str]:
    if os.geteuid() != 0:
        pytest.skip("a PID namespace needs root")
    code = PID1.format(install="_stop_on_sigterm()" if install else "threading.Event()")
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )


def _sigterm_pid1(proc: subprocess.Popen[str]) -> int | None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    child = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    os.kill(int(child[0]), signal.SIGTERM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc.poll()


def test_sigterm_stops_a_steer_process_running_as_pid_1() -> None:
    with _as_pid1(install=True) as proc:
        try:
            assert _sigterm_pid1(proc) == 0
        finally:
            proc.kill()


def test_without_the_handler_pid_1_ignores_sigterm() -> None:
    """Why the handler is needed: the same process without it lives on."""
    with _as_pid1(install=False) as proc:
        try:
            assert _sigterm_pid1(proc) is None
        finally:
            proc.kill()
