"""Tiny workloads for lab pods: a TCP echo server, an HTTP server, and clients.

Sockets are created on a thread inside the pod's network namespace and then served from
ordinary threads: a socket keeps the namespace it was created in, so one process can play
every pod. `steer demo` and the tests share these.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseRequestHandler, ThreadingTCPServer

from steer.node.netns import run_in_netns

SO_ORIGINAL_DST = 80


def _bound_socket(netns: str, ip: str, port: int) -> socket.socket:
    def create() -> socket.socket:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(128)
        return sock

    return run_in_netns(netns, create)


class _EchoHandler(BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


def answered_from(body: bytes) -> str | None:
    """The address the lab's HTTP server saw the request come from, read from its answer
    (Envoy's when Envoy forwarded it); None for a body that is not such an answer."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    peer = document.get("peer") if isinstance(document, dict) else None
    return peer if isinstance(peer, str) else None


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "steer-lab"

    def _reply(self) -> None:
        body = json.dumps(
            {
                "pod": getattr(self.server, "pod_name", ""),
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("host", ""),
                "peer": self.client_address[0],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _reply

    def log_message(self, format: str, *args: object) -> None:
        return


class _ReusedTCPServer(ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _ReusedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True


@contextmanager
def serve(
    netns: str, ip: str, port: int, *, http: bool, pod_name: str = ""
) -> Iterator[tuple[str, int]]:
    """Serve echo (http=False) or HTTP on ip:port inside `netns` until the block ends."""
    sock = _bound_socket(netns, ip, port)
    server: ThreadingTCPServer | ThreadingHTTPServer
    if http:
        server = _ReusedHTTPServer((ip, port), _HttpHandler, bind_and_activate=False)
        server.pod_name = pod_name  # type: ignore[attr-defined]
    else:
        server = _ReusedTCPServer((ip, port), _EchoHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield ip, port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def connect(netns: str, ip: str, port: int, timeout: float = 2.0) -> socket.socket:
    """A TCP connection made from inside `netns`."""
    return run_in_netns(netns, lambda: socket.create_connection((ip, port), timeout=timeout))


def http_connection(netns: str, ip: str, port: int, timeout: float = 2.0) -> HttpClient:
    return HttpClient(connect(netns, ip, port, timeout), f"{ip}:{port}")


@dataclass
class HttpClient:
    """One keep-alive HTTP/1.1 connection over a socket made in a pod's namespace."""

    sock: socket.socket
    host: str
    _conn: http.client.HTTPConnection = field(init=False)

    def __post_init__(self) -> None:
        self._conn = http.client.HTTPConnection(self.host)
        self._conn.sock = self.sock

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        self._conn.request(method, path, headers=headers or {})
        response = self._conn.getresponse()
        body = response.read()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}

    def close(self) -> None:
        self._conn.close()


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST of a REDIRECTed connection, as Envoy's original_dst filter reads it."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed_ip = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed_ip), port


def time_connect(netns: str, ip: str, port: int, timeout: float = 3.0) -> tuple[str, float]:
    """How a connect ends ('connected', 'refused', 'timeout') and how long it took."""
    started = time.perf_counter()
    try:
        connect(netns, ip, port, timeout).close()
        outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    return outcome, time.perf_counter() - started
