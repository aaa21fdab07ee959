"""A worker process that lives inside a lab pod: in its network namespace AND its cgroup.

The thread-based helpers in ``steer.lab.servers`` put sockets in a pod's network
namespace, but the sockets still belong to the cgroup of the test process. cgroup BPF
hooks (connect4, sockops, sk_msg) look at the cgroup of the task that creates a
socket, so a datapath built on them only sees a workload that really runs in the
pod's cgroup. This module is that workload: one long-lived child per pod that joins
the pod's cgroup and netns before it creates a single socket, and then opens
connections, serves HTTP or echo, or runs commands (wrk, ip, ss) on request.

The parent drives it over stdin/stdout with JSON lines, one request and one response
at a time::

    with PodProcess.start(pod.netns, pod.cgroup) as client:
        reply = client.request(web.ip, 8080, "GET", "/public/hello")

Run as ``python -m steer.lab.podproc --netns NS --cgroup DIR``, the module is the
worker itself.
"""

from __future__ import annotations

import argparse
import base64
import errno
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from steer.lab.servers import original_dst, serve
from steer.node.netns import enter_netns, netns_path

# Socket timeout for the operations that take none (echo, raw TCP), so that a silent
# peer turns into an error instead of a worker that never answers again.
IO_TIMEOUT_S = 3.0
# How long the worker may take to start: an interpreter plus the http/socketserver imports.
STARTUP_TIMEOUT_S = 10.0
# Slack the parent adds on top of an operation's own bound before it declares the
# worker wedged. Only a bug trips it: every operation is bounded inside the worker.
_GUARD_S = 30.0
# The source tree this module was loaded from, so the worker runs the very same code as
# the parent even where the venv's editable install points at another checkout.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


class PodProcessError(RuntimeError):
    """The pod worker reported an error, or died, or stopped answering."""


@dataclass(frozen=True)
class HttpReply:
    status: int
    # Lowercased names; a repeated header is joined with ", " as RFC 9110 allows.
    headers: dict[str, str]
    body: bytes
    # The client's source port: the same port on two replies proves keep-alive.
    local_port: int


# --- parent side ------------------------------------------------------------------------------


class PodProcess:
    """The parent's handle on one worker; make it with ``PodProcess.start``."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.pid: int = proc.pid
        self._next_id = 0
        self._buffer = b""
        self._dead: str | None = None
        # Per-connection timeouts, so the parent's wedge guard never undercuts them.
        self._timeouts: dict[int, float] = {}
        # One request in flight at a time: responses carry no routing beyond their id.
        self._lock = threading.Lock()

    @classmethod
    @contextmanager
    def start(cls, netns: str, cgroup: str) -> Iterator[PodProcess]:
        """Start a worker in ``netns`` and ``cgroup``; it is killed when the block ends."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, "--netns", netns, "--cgroup", cgroup],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # stderr is inherited: tracebacks from serving threads land in the test log.
            env=env,
            # Its own process group: a terminal's Ctrl-C does not reach it half-way
            # through a teardown, and killpg also takes down what `run` started.
            start_new_session=True,
        )
        worker = cls(proc)
        try:
            worker._await_ready()
            yield worker
        finally:
            worker._kill()

    # Operations. Each mirrors a ``_Worker.op_*`` method of the same name.

    def http_open(self, ip: str, port: int, timeout: float = 3.0) -> int:
        """Open a keep-alive HTTP/1.1 connection; ``timeout`` bounds connect and each read."""
        conn = _as_int(self._call("http_open", timeout, ip=ip, port=port, timeout=timeout))
        self._timeouts[conn] = timeout
        return conn

    def http_request(
        self,
        conn: int,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        body: bytes = b"",
    ) -> HttpReply:
        """Send one request on ``conn`` exactly as given and read the whole reply.

        The request line is ``method path HTTP/1.1`` verbatim (no case folding, no path
        normalisation), followed by ``headers`` in order, repeats included. A ``Host``
        header (``ip:port``) is added only when ``headers`` has none. ``body`` follows the
        head as it is: no Content-Length is added for it.
        """
        result = self._call(
            "http_request",
            self._timeouts.get(conn, IO_TIMEOUT_S),
            conn=conn,
            method=method,
            path=path,
            headers=[[name, value] for name, value in headers or []],
            body=_b64(body),
        )
        if not isinstance(result, dict):
            raise PodProcessError(f"malformed http reply: {result!r}")
        raw_headers = result.get("headers")
        if not isinstance(raw_headers, dict):
            raise PodProcessError(f"malformed http reply headers: {raw_headers!r}")
        return HttpReply(
            status=_as_int(result.get("status")),
            headers={str(k): str(v) for k, v in raw_headers.items()},
            body=_unb64(result.get("body")),
            local_port=_as_int(result.get("local_port")),
        )

    def http_close(self, conn: int) -> None:
        self._call("http_close", 0.0, conn=conn)
        self._timeouts.pop(conn, None)

    def request(
        self,
        ip: str,
        port: int,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        body: bytes = b"",
    ) -> HttpReply:
        """One request on a connection of its own."""
        conn = self.http_open(ip, port)
        try:
            return self.http_request(conn, method, path, headers, body=body)
        finally:
            self.http_close(conn)

    def connect_outcome(self, ip: str, port: int, timeout: float = 3.0) -> tuple[str, float]:
        """How a TCP connect ends and how long it took, measured inside the worker.

        The outcome is one of "connected", "refused", "reset", "eperm" (a cgroup
        connect hook said no), "timeout", or "error:<errno name>" (e.g.
        "error:EHOSTUNREACH" for an ICMP reject).
        """
        result = self._call("connect_outcome", timeout, ip=ip, port=port, timeout=timeout)
        if not (isinstance(result, list) and len(result) == 2 and isinstance(result[0], str)):
            raise PodProcessError(f"malformed connect outcome: {result!r}")
        return result[0], _as_float(result[1])

    def echo_rounds(self, ip: str, port: int, rounds: int, size: int = 8) -> int:
        """Round trips of ``size`` bytes on one connection to an echo server.

        Returns how many rounds came back intact; the count stops early when the peer
        resets, closes, stalls for ``IO_TIMEOUT_S`` or echoes something else. A failed
        connect raises instead, since no round was ever tried.
        """
        bound = IO_TIMEOUT_S * (rounds + 1)
        result = self._call("echo_rounds", bound, ip=ip, port=port, rounds=rounds, size=size)
        return _as_int(result)

    def open_tcp(self, ip: str, port: int) -> int:
        """A long-lived raw TCP connection (for revocation tests); returns its id."""
        return _as_int(self._call("open_tcp", IO_TIMEOUT_S, ip=ip, port=port))

    def tcp_echo(self, conn: int, payload: bytes) -> bytes | None:
        """Send ``payload`` and read as many bytes back; None if the peer reset or closed.

        A peer that stays silent for ``IO_TIMEOUT_S`` raises PodProcessError.
        """
        result = self._call("tcp_echo", IO_TIMEOUT_S, conn=conn, payload=_b64(payload))
        return None if result is None else _unb64(result)

    def tcp_close(self, conn: int) -> None:
        self._call("tcp_close", 0.0, conn=conn)

    def open_tcp6(self, ip: str, port: int) -> int:
        """`open_tcp` from an AF_INET6 socket (a v4-mapped `ip` such as ::ffff:10.0.0.1)."""
        return _as_int(self._call("open_tcp6", IO_TIMEOUT_S, ip=ip, port=port))

    def peername(self, conn: int) -> tuple[str, int]:
        """getpeername() of a connection `open_tcp` or `open_tcp6` made: the address the
        application is told it is talking to."""
        result = self._call("peername", IO_TIMEOUT_S, conn=conn)
        if not (isinstance(result, list) and len(result) == 2):
            raise PodProcessError(f"malformed peer name: {result!r}")
        return str(result[0]), _as_int(result[1])

    def serve_http(self, ip: str, port: int, name: str) -> None:
        """Serve ``steer.lab.servers``' HTTP handler on ip:port (answering as pod
        ``name``) until the worker exits; returns once the socket is listening."""
        self._call("serve_http", 0.0, ip=ip, port=port, name=name)

    def serve_echo(self, ip: str, port: int) -> None:
        """Serve TCP echo on ip:port until the worker exits; returns once listening."""
        self._call("serve_echo", 0.0, ip=ip, port=port)

    def listen(self, ip: str, port: int) -> int:
        """A bare listening socket (no server behind it), for accept_original_dst."""
        return _as_int(self._call("listen", 0.0, ip=ip, port=port))

    def accept_original_dst(self, listener: int, timeout: float = 3.0) -> tuple[str, int]:
        """Accept one connection and report its SO_ORIGINAL_DST, as Envoy's original_dst
        listener filter reads it (from conntrack, or from steer's getsockopt program)."""
        result = self._call("accept_original_dst", timeout, listener=listener, timeout=timeout)
        return str(result[0]), _as_int(result[1])

    def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        """Run ``argv`` as a child of the worker, so it inherits the pod's netns and cgroup.

        Returns (returncode, stdout, stderr). Past ``timeout`` the command is killed and
        PodProcessError is raised.
        """
        result = self._call("run", timeout, argv=argv, timeout=timeout)
        if not (isinstance(result, list) and len(result) == 3):
            raise PodProcessError(f"malformed run result: {result!r}")
        return _as_int(result[0]), str(result[1]), str(result[2])

    # Plumbing.

    def _call(self, op: str, bound: float, **args: Any) -> Any:
        """Send one request and wait for its response, at most ``bound`` + guard seconds."""
        with self._lock:
            if self._dead is not None:
                raise PodProcessError(self._dead)
            self._next_id += 1
            request_id = self._next_id
            line = json.dumps({"id": request_id, "op": op, "args": args}) + "\n"
            stdin = self._proc.stdin
            assert stdin is not None  # Popen was given stdin=PIPE
            try:
                stdin.write(line.encode())
                stdin.flush()
            except BrokenPipeError:
                self._fail(f"pod worker {self.pid} is gone (stdin closed)")
            response = self._read_message(time.monotonic() + bound + _GUARD_S, op)
            if response.get("id") != request_id:
                # The stream is out of step; nothing after this could be trusted.
                self._fail(f"pod worker {self.pid} answered {response!r} to request {request_id}")
            if "error" in response:
                raise PodProcessError(f"{op}: {response['error']}")
            return response.get("result")

    def _await_ready(self) -> None:
        message = self._read_message(time.monotonic() + STARTUP_TIMEOUT_S, "start")
        if "error" in message:
            self._fail(f"pod worker could not start: {message['error']}")
        if "ready" not in message:
            self._fail(f"pod worker sent {message!r} instead of its ready line")

    def _read_message(self, deadline: float, op: str) -> dict[str, Any]:
        # select + os.read on the raw descriptor rather than readline(), which cannot
        # time out: a wedged worker must become an error, not a hung test run.
        stdout = self._proc.stdout
        assert stdout is not None  # Popen was given stdout=PIPE
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"pod worker {self.pid} did not answer {op!r} in time; killed it")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self._fail(f"pod worker {self.pid} exited during {op!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            self._fail(f"pod worker {self.pid} wrote a non-JSON line: {line[:200]!r}")
        if not isinstance(message, dict):
            self._fail(f"pod worker {self.pid} wrote {message!r}, not an object")
        return message

    def _fail(self, reason: str) -> NoReturn:
        """Give up on the worker: kill it and make every later call fail with ``reason``."""
        self._dead = reason
        self._kill()
        raise PodProcessError(reason)

    def _kill(self) -> None:
        if self._dead is None:
            self._dead = f"pod worker {self.pid} was stopped"
        # killpg while the worker is unreaped, so its pid (= process group id) cannot
        # have been reused; the group holds whatever `run` started, too.
        if self._proc.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=_GUARD_S)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with suppress(OSError):  # an unflushed write to a dead pipe
                    pipe.close()


def _as_int(value: Any) -> int:
    # bool is an int subclass, but never a valid count, port or id here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise PodProcessError(f"expected an integer from the pod worker, got {value!r}")
    return value


def _as_float(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PodProcessError(f"expected a number from the pod worker, got {value!r}")
    return float(value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise PodProcessError(f"expected base64 text from the pod worker, got {value!r}")
    return base64.b64decode(value)


# --- worker side ------------------------------------------------------------------------------


class _NoReconnectHTTPConnection(http.client.HTTPConnection):
    # http.client silently opens a new connection when the old one was closed; that
    # would hide exactly what keep-alive and revocation tests look for.
    auto_open = 0


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes from ``sock``, or None if the peer closed or reset first."""
    data = b""
    try:
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    return data


class _Worker:
    """The worker's state and operations; runs in the pod after ``_enter_pod``."""

    def __init__(self, netns: str) -> None:
        self._netns = netns
        self._next_conn = 0
        self._http: dict[int, tuple[_NoReconnectHTTPConnection, str]] = {}
        self._tcp: dict[int, socket.socket] = {}
        self.servers = ExitStack()

    def _conn_id(self) -> int:
        self._next_conn += 1
        return self._next_conn

    def op_http_open(self, ip: str, port: int, timeout: float) -> int:
        sock = socket.create_connection((ip, port), timeout=timeout)
        conn = _NoReconnectHTTPConnection(ip, port, timeout=timeout)
        conn.sock = sock
        conn_id = self._conn_id()
        self._http[conn_id] = (conn, f"{ip}:{port}")
        return conn_id

    def op_http_request(
        self, conn: int, method: str, path: str, headers: list[list[str]], body: str = ""
    ) -> dict[str, Any]:
        http_conn, host = self._http_conn(conn)
        if http_conn.sock is None:
            raise ConnectionError(f"connection {conn} was closed by the server")
        local_port: int = http_conn.sock.getsockname()[1]
        # putrequest writes "method url HTTP/1.1" as given (it only refuses control
        # characters); skip_* stops it from adding headers the caller did not ask for.
        http_conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if not any(name.lower() == "host" for name, _ in headers):
            http_conn.putheader("Host", host)
        for name, value in headers:
            http_conn.putheader(name, value)
        http_conn.endheaders(base64.b64decode(body) or None)
        response = http_conn.getresponse()
        received = response.read()
        merged: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return {
            "status": response.status,
            "headers": merged,
            "body": _b64(received),
            "local_port": local_port,
        }

    def op_http_close(self, conn: int) -> None:
        self._http_conn(conn)[0].close()
        del self._http[conn]

    def _http_conn(self, conn: int) -> tuple[_NoReconnectHTTPConnection, str]:
        if conn not in self._http:
            raise LookupError(f"no http connection {conn}")
        return self._http[conn]

    def op_connect_outcome(self, ip: str, port: int, timeout: float) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            socket.create_connection((ip, port), timeout=timeout).close()
            outcome = "connected"
        except ConnectionRefusedError:
            outcome = "refused"
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
        except OSError as exc:
            # EPERM is what a cgroup connect4 hook's "deny" looks like to the caller.
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            outcome = "eperm" if exc.errno == errno.EPERM else f"error:{name}"
        return outcome, time.perf_counter() - started

    def op_echo_rounds(self, ip: str, port: int, rounds: int, size: int) -> int:
        if size < 1:
            raise ValueError("size must be at least 1")
        with socket.create_connection((ip, port), timeout=IO_TIMEOUT_S) as sock:
            for done in range(rounds):
                # A different payload each round, so a stale or misrouted echo is caught.
                payload = str(done).encode().rjust(size, b"0")[-size:]
                try:
                    sock.sendall(payload)
                    if _recv_exactly(sock, size) != payload:
                        return done
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    return done
        return rounds

    def op_open_tcp(self, ip: str, port: int) -> int:
        conn_id = self._conn_id()
        self._tcp[conn_id] = socket.create_connection((ip, port), timeout=IO_TIMEOUT_S)
        return conn_id

    def op_open_tcp6(self, ip: str, port: int) -> int:
        conn_id = self._conn_id()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.settimeout(IO_TIMEOUT_S)
        try:
            sock.connect((ip, port))
        except OSError:
            sock.close()
            raise
        self._tcp[conn_id] = sock
        return conn_id

    def op_peername(self, conn: int) -> tuple[str, int]:
        peer = self._tcp_conn(conn).getpeername()
        return str(peer[0]), int(peer[1])

    def op_tcp_echo(self, conn: int, payload: str) -> str | None:
        data = base64.b64decode(payload)
        sock = self._tcp_conn(conn)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return None
        echoed = _recv_exactly(sock, len(data))
        return None if echoed is None else _b64(echoed)

    def op_tcp_close(self, conn: int) -> None:
        self._tcp_conn(conn).close()
        del self._tcp[conn]

    def _tcp_conn(self, conn: int) -> socket.socket:
        if conn not in self._tcp:
            raise LookupError(f"no tcp connection {conn}")
        return self._tcp[conn]

    def op_listen(self, ip: str, port: int) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(16)
        conn_id = self._conn_id()
        self._tcp[conn_id] = sock
        return conn_id

    def op_accept_original_dst(self, listener: int, timeout: float) -> tuple[str, int]:
        sock = self._tcp_conn(listener)
        sock.settimeout(timeout)
        conn, _ = sock.accept()
        with conn:
            return original_dst(conn)

    def op_serve_http(self, ip: str, port: int, name: str) -> None:
        # servers.serve joins the netns on a helper thread; here that is the namespace
        # the worker is already in, and the socket is charged to the worker's cgroup.
        self.servers.enter_context(serve(self._netns, ip, port, http=True, pod_name=name))

    def op_serve_echo(self, ip: str, port: int) -> None:
        self.servers.enter_context(serve(self._netns, ip, port, http=False))

    def op_run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        # stdin is /dev/null so the command can never eat the worker's own requests.
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
        return (
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler: Callable[..., Any] | None = getattr(self, f"op_{op}", None)
        if not isinstance(op, str) or handler is None:
            return {"id": request.get("id"), "error": f"unknown operation {op!r}"}
        try:
            result = handler(**request.get("args", {}))
        except Exception as exc:  # reported to the parent, which raises it there
            return {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        return {"id": request.get("id"), "result": result}


def _enter_pod(netns: str, cgroup: Path) -> str:
    """Join ``cgroup`` and then ``netns``, check both, and return the cgroup path.

    The cgroup comes first and before any socket: a socket is tagged with its
    creator's cgroup at creation and keeps that tag, whatever the process does later.
    """
    (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")
    # /proc/self/cgroup's "0::" line is the v2 path the kernel (and BPF) sees, relative
    # to the cgroup2 mount; on a hybrid host the v1 lines around it do not matter.
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line[3:] for line in lines if line.startswith("0::")), "")
    if own in {"", "/"} or not str(cgroup).endswith(own):
        raise RuntimeError(f"joined {cgroup} but /proc/self/cgroup says {own!r}")
    enter_netns(netns)
    want, have = netns_path(netns).stat(), Path("/proc/self/ns/net").stat()
    if (want.st_dev, want.st_ino) != (have.st_dev, have.st_ino):
        raise RuntimeError(f"setns into {netns!r} did not take")
    return own


def _send(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="steer pod worker (driven by PodProcess)")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--cgroup", required=True, type=Path)
    args = parser.parse_args(argv)

    # The protocol gets a private copy of stdout, and fd 1 becomes stderr: a stray
    # print (ours or a library's) must not be read by the parent as a response.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        own_cgroup = _enter_pod(args.netns, args.cgroup)
    except Exception as exc:
        _send(out, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(out, {"ready": {"pid": os.getpid(), "cgroup": own_cgroup}})

    worker = _Worker(args.netns)
    with worker.servers:
        # EOF on stdin (the parent closed it or died) ends the worker.
        for line in sys.stdin.buffer:
            try:
                request = json.loads(line)
            except ValueError as exc:
                _send(out, {"id": None, "error": f"malformed request: {exc}"})
                continue
            if not isinstance(request, dict):
                _send(out, {"id": None, "error": "a request must be a JSON object"})
                continue
            _send(out, worker.handle(request))
    return 0


if __name__ == "__main__":
    sys.exit(main())
