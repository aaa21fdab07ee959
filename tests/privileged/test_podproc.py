"""PodProcess against a real lab: the worker lives in its pod's cgroup and netns.

Namespace and cgroup names are global, so this module owns the machine's one lab while
it runs and refuses to start next to another one (a demo, the e2e node, test_lab).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from steer.demo import leftovers
from steer.lab.podproc import PodProcess, PodProcessError
from steer.lab.spec import LabPod, LabState, default_lab_specs
from steer.lab.updown import lab_down, lab_up
from steer.node.cgroups import cgroup2_root
from steer.node.netns import netns_path, run_in_netns

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and cgroups"),
]

HTTP_PORT = 8080
ECHO_PORT = 7000
CLOSED_PORT = 9090


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    """The default lab, like conftest's, plus checks that no worker outlived its test
    and that the pod cgroups could be removed afterwards."""
    if left := leftovers():
        pytest.fail(f"a steer lab already exists ({', '.join(left)}); run `steer lab down`")
    state_file = tmp_path_factory.mktemp("lab") / "lab.json"
    try:
        state = lab_up(default_lab_specs(), state_file=state_file)
        yield state
        # Checked before lab_down, whose cgroup.kill would hide a leaked worker.
        leaked = {pod.name: cgroup_pids(pod) for pod in state.pods if cgroup_pids(pod)}
        assert not leaked, f"processes left in pod cgroups: {leaked}"
    finally:
        # Raises if a pod cgroup cannot be removed, e.g. because a process is still in it.
        lab_down(state_file=state_file)
    assert not leftovers()


@pytest.fixture(scope="module")
def web(lab: LabState) -> Iterator[PodProcess]:
    """A worker in `web` serving HTTP on :8080 and echo on :7000 for the whole module."""
    pod = lab.pod("default", "web")
    with PodProcess.start(pod.netns, pod.cgroup) as worker:
        worker.serve_http(pod.ip, HTTP_PORT, "web")
        worker.serve_echo(pod.ip, ECHO_PORT)
        yield worker


@pytest.fixture
def client(lab: LabState) -> Iterator[PodProcess]:
    pod = lab.pod("default", "client")
    with PodProcess.start(pod.netns, pod.cgroup) as worker:
        yield worker


def cgroup_pids(pod: LabPod) -> list[int]:
    return [int(pid) for pid in (Path(pod.cgroup) / "cgroup.procs").read_text().split()]


def cgroup_v2_path(pod: LabPod) -> str:
    """The pod cgroup as /proc/<pid>/cgroup and `ss --cgroup` name it."""
    return "/" + str(Path(pod.cgroup).relative_to(cgroup2_root()))


def ns_identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


@contextmanager
def raw_listener(
    pod: LabPod, reply: bytes | None, reset_when: threading.Event | None = None
) -> Iterator[tuple[int, list[bytes]]]:
    """A one-shot listener in ``pod``'s netns that records the raw request head.

    It answers with ``reply``, or with a TCP reset if ``reply`` is None: at once, or once
    ``reset_when`` is set (a reset that beats the client's own view of its connect makes
    the connect itself fail). Yields the port and a list that holds the request bytes
    once the exchange is over.
    """
    server = run_in_netns(pod.netns, lambda: socket.create_server((pod.ip, 0)))
    server.settimeout(5)
    received: list[bytes] = []

    def answer() -> None:
        conn, _peer = server.accept()
        with conn:
            if reply is None:
                if reset_when is not None:
                    reset_when.wait(timeout=5)
                # Linger 0 turns close() into a RST instead of a FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            received.append(head)
            conn.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        thread.join(timeout=5)
        server.close()


def test_worker_is_in_the_pods_cgroup_and_netns(lab: LabState, client: PodProcess) -> None:
    pod = lab.pod("default", "client")
    assert client.pid in cgroup_pids(pod)
    assert f"0::{cgroup_v2_path(pod)}" in Path(f"/proc/{client.pid}/cgroup").read_text()
    netns = ns_identity(Path(f"/proc/{client.pid}/ns/net"))
    assert netns == ns_identity(netns_path(pod.netns))
    # The parent stays where it was: only the worker moved.
    assert os.getpid() not in cgroup_pids(pod)
    assert ns_identity(Path("/proc/self/ns/net")) != netns


def test_sockets_are_charged_to_the_pod_cgroups(
    lab: LabState, client: PodProcess, web: PodProcess
) -> None:
    client_pod, web_pod = lab.pod("default", "client"), lab.pod("default", "web")
    conn = client.http_open(web_pod.ip, HTTP_PORT)
    reply = client.http_request(conn, "GET", "/who")
    # The kernel's own record of each socket's cgroup, which is what cgroup BPF sees.
    _, client_ss, _ = client.run(["ss", "-Htn", "--cgroup", "state", "established"], 10)
    _, web_ss, _ = web.run(["ss", "-Htn", "--cgroup"], 10)
    client.http_close(conn)

    assert json.loads(reply.body)["peer"] == client_pod.ip
    local = f"{client_pod.ip}:{reply.local_port}"
    assert [line for line in client_ss.splitlines() if local in line], client_ss
    for line in client_ss.splitlines():
        assert f"cgroup:{cgroup_v2_path(client_pod)}" in line, client_ss
    # The server side: the listener and the accepted connection belong to web.
    served = [line for line in web_ss.splitlines() if local in line]
    assert served, web_ss
    assert all(f"cgroup:{cgroup_v2_path(web_pod)}" in line for line in served), web_ss


def test_http_keep_alive(lab: LabState, client: PodProcess, web: PodProcess) -> None:
    client_pod, web_pod = lab.pod("default", "client"), lab.pod("default", "web")
    conn = client.http_open(web_pod.ip, HTTP_PORT)
    try:
        first = client.http_request(conn, "GET", "/one")
        second = client.http_request(conn, "POST", "/two")
    finally:
        client.http_close(conn)
    assert (first.status, second.status) == (200, 200)
    assert first.local_port == second.local_port
    assert first.headers["content-type"] == "application/json"
    assert json.loads(first.body) == {
        "pod": "web",
        "method": "GET",
        "path": "/one",
        "host": f"{web_pod.ip}:{HTTP_PORT}",
        "peer": client_pod.ip,
    }
    assert json.loads(second.body)["method"] == "POST"


def test_one_shot_requests_use_fresh_connections(lab: LabState, client: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    first = client.request(web_pod.ip, HTTP_PORT, "GET", "/a")
    second = client.request(web_pod.ip, HTTP_PORT, "GET", "/a")
    assert (first.status, second.status) == (200, 200)
    assert first.local_port != second.local_port


@pytest.mark.parametrize("path", ["/public/../admin", "//a", "/a%2fb", "/a/./b?x=../y"])
def test_paths_are_not_normalised(lab: LabState, client: PodProcess, path: str) -> None:
    # A raw listener, not the lab's HTTP server: http.server itself collapses a leading
    # "//" to "/" (CPython's open-redirect fix), which would blame the client for it.
    web_pod = lab.pod("default", "web")
    with raw_listener(web_pod, b"HTTP/1.1 204 No Content\r\n\r\n") as (port, received):
        assert client.request(web_pod.ip, port, "GET", path).status == 204
    assert received[0].startswith(f"GET {path} HTTP/1.1\r\n".encode())


def test_request_head_is_sent_verbatim(lab: LabState, client: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    canned = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    headers = [("X-Twice", "1"), ("x-twice", "2"), ("Host", "web.example")]
    with raw_listener(web_pod, canned) as (port, received):
        reply = client.request(web_pod.ip, port, "get", "/public/../admin", headers)
    assert received == [
        b"get /public/../admin HTTP/1.1\r\nX-Twice: 1\r\nx-twice: 2\r\nHost: web.example\r\n\r\n"
    ]
    assert (reply.status, reply.body) == (200, b"ok")
    assert reply.headers["set-cookie"] == "a=1, b=2"


def test_host_header_is_added_only_when_missing(lab: LabState, client: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    with raw_listener(web_pod, b"HTTP/1.1 204 No Content\r\n\r\n") as (port, received):
        assert client.request(web_pod.ip, port, "HEAD", "/").status == 204
    assert received == [f"HEAD / HTTP/1.1\r\nHost: {web_pod.ip}:{port}\r\n\r\n".encode()]


def test_connect_outcomes(lab: LabState, client: PodProcess, web: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    outcome, seconds = client.connect_outcome(web_pod.ip, CLOSED_PORT)
    assert outcome == "refused"
    assert seconds < 0.5
    assert client.connect_outcome(web_pod.ip, ECHO_PORT)[0] == "connected"


def test_echo_rounds_on_one_connection(lab: LabState, client: PodProcess, web: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    assert client.echo_rounds(web_pod.ip, ECHO_PORT, rounds=200) == 200
    assert client.echo_rounds(web_pod.ip, ECHO_PORT, rounds=3, size=4096) == 3
    with pytest.raises(PodProcessError, match="ConnectionRefused"):
        client.echo_rounds(web_pod.ip, CLOSED_PORT, rounds=1)


def test_long_lived_tcp(lab: LabState, client: PodProcess, web: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    conn = client.open_tcp(web_pod.ip, ECHO_PORT)
    assert client.tcp_echo(conn, b"hello") == b"hello"
    assert client.tcp_echo(conn, bytes(range(256))) == bytes(range(256))
    client.tcp_close(conn)
    with pytest.raises(PodProcessError, match="no tcp connection"):
        client.tcp_echo(conn, b"x")


def test_tcp_echo_reports_a_reset_peer(lab: LabState, client: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    opened = threading.Event()
    with raw_listener(web_pod, None, reset_when=opened) as (port, _):
        conn = client.open_tcp(web_pod.ip, port)
        opened.set()
    # The listener has sent its reset by the time the block has ended; give the reset the
    # moment it needs to cross the veth and be processed by the client's stack.
    time.sleep(0.2)
    assert client.tcp_echo(conn, b"after the reset") is None
    client.tcp_close(conn)


def test_serve_in_one_pod_request_from_another(lab: LabState, client: PodProcess) -> None:
    api_pod, client_pod = lab.pod("default", "api"), lab.pod("default", "client")
    with PodProcess.start(api_pod.netns, api_pod.cgroup) as api:
        api.serve_http(api_pod.ip, HTTP_PORT, "api")
        reply = client.request(api_pod.ip, HTTP_PORT, "DELETE", "/things/1")
        with pytest.raises(PodProcessError, match="Address already in use"):
            api.serve_echo(api_pod.ip, HTTP_PORT)
    body = json.loads(reply.body)
    assert (body["pod"], body["method"], body["peer"]) == ("api", "DELETE", client_pod.ip)


def test_run_inherits_the_pod(lab: LabState, client: PodProcess) -> None:
    pod = lab.pod("default", "client")
    rc, out, err = client.run(["ip", "-br", "addr"], timeout=10)
    assert (rc, err) == (0, "")
    eth0 = next(line for line in out.splitlines() if line.startswith("eth0"))
    assert f"{pod.ip}/32" in eth0
    _, cgroup, _ = client.run(["cat", "/proc/self/cgroup"], timeout=10)
    assert f"0::{cgroup_v2_path(pod)}" in cgroup.splitlines()
    assert client.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10) == (
        3,
        "out\n",
        "err\n",
    )


def test_errors_are_raised_and_the_worker_carries_on(lab: LabState, client: PodProcess) -> None:
    web_pod = lab.pod("default", "web")
    with pytest.raises(PodProcessError, match="no http connection 999"):
        client.http_request(999, "GET", "/")
    with pytest.raises(PodProcessError, match="FileNotFoundError"):
        client.run(["/nonexistent/binary"], timeout=5)
    with pytest.raises(PodProcessError, match="timed out"):
        client.run(["sleep", "5"], timeout=0.2)
    assert client.request(web_pod.ip, HTTP_PORT, "GET", "/still-here").status == 200


def test_worker_dies_when_the_block_fails(lab: LabState) -> None:
    pod = lab.pod("default", "client")
    with (
        pytest.raises(RuntimeError, match="mid-test"),
        PodProcess.start(pod.netns, pod.cgroup) as worker,
    ):
        pid = worker.pid
        worker.serve_echo(pod.ip, ECHO_PORT)  # a live serving thread does not keep it up
        raise RuntimeError("mid-test")
    assert not Path(f"/proc/{pid}").exists()
    assert pid not in cgroup_pids(pod)
    with pytest.raises(PodProcessError, match="stopped"):
        worker.connect_outcome(pod.ip, ECHO_PORT)


def test_worker_exits_when_stdin_closes(lab: LabState) -> None:
    pod = lab.pod("default", "client")
    worker = [sys.executable, "-m", "steer.lab.podproc"]
    proc = subprocess.Popen(
        [*worker, "--netns", pod.netns, "--cgroup", pod.cgroup],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert "ready" in json.loads(proc.stdout.readline())
        proc.stdin.close()
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


@pytest.mark.parametrize("bad", ["netns", "cgroup"])
def test_a_worker_that_cannot_enter_its_pod_fails_to_start(lab: LabState, bad: str) -> None:
    pod = lab.pod("default", "client")
    netns = "steer-pod-no-such-pod" if bad == "netns" else pod.netns
    cgroup = str(Path(pod.cgroup).parent / "no-such-pod") if bad == "cgroup" else pod.cgroup
    with pytest.raises(PodProcessError, match="could not start"), PodProcess.start(netns, cgroup):
        pass
    assert cgroup_pids(pod) == []
