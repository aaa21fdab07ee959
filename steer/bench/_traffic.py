"""The load of `steer bench l4-rules`: a TCP server and its client, run inside lab pods.

    python -m steer.bench._traffic serve IP PORT
    python -m steer.bench._traffic measure IP PORT SECONDS

`serve` returns as soon as it listens and serves from a forked child, so a pod worker's
`run` (which waits for the command to finish) can start it; the child stays in the
worker's process group, which the worker's teardown kills. `measure` prints one JSON line:

    {"bulk_gbps": ..., "small_msgs_per_s": ...}

Bulk is 64 KiB writes for SECONDS, timed until the server has confirmed every byte it
read, so bytes still queued in socket buffers never count. Small is 64-byte request and
response round trips with TCP_NODELAY for SECONDS: each message is one packet each way,
so the figure moves with the cost a datapath adds per packet.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import sys
import time

BULK_WRITE = 64 * 1024
SMALL_MESSAGE = 64
MODE_BULK = b"B"
MODE_SMALL = b"S"
# Bounds a stalled peer (a dropped flow, a dead server) instead of hanging the run.
IO_TIMEOUT_S = 5.0
_TOTAL = struct.Struct("!Q")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return data


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IO_TIMEOUT_S)
        mode = sock.recv(1)
        if mode == MODE_BULK:
            self._sink(sock)
        elif mode == MODE_SMALL:
            self._echo(sock)

    @staticmethod
    def _sink(sock: socket.socket) -> None:
        # recv_into one buffer: the receiver must not be what limits the figure.
        buffer = bytearray(4 * BULK_WRITE)
        total = 0
        while read := sock.recv_into(buffer):
            total += read
        sock.sendall(_TOTAL.pack(total))

    @staticmethod
    def _echo(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                sock.sendall(_recv_exactly(sock, SMALL_MESSAGE))
        except ConnectionError:
            return  # the client is done


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(ip: str, port: int) -> None:
    server = _Server((ip, port), _Handler)
    if os.fork() != 0:
        # Listening already: whoever waits for this process may connect at once.
        os._exit(0)
    # The caller reads our output until EOF; holding its pipes would keep it waiting.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    server.serve_forever()


def _connect(ip: str, port: int, mode: bytes) -> socket.socket:
    sock = socket.create_connection((ip, port), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mode)
    return sock


def bulk_gbps(ip: str, port: int, seconds: float) -> float:
    payload = bytes(BULK_WRITE)
    with _connect(ip, port, MODE_BULK) as sock:
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        (received,) = _TOTAL.unpack(_recv_exactly(sock, _TOTAL.size))
        elapsed = time.monotonic() - started
    return float(received) * 8 / elapsed / 1e9


def small_msgs_per_s(ip: str, port: int, seconds: float) -> float:
    message = bytes(SMALL_MESSAGE)
    count = 0
    with _connect(ip, port, MODE_SMALL) as sock:
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            sock.sendall(message)
            _recv_exactly(sock, SMALL_MESSAGE)
            count += 1
        elapsed = time.monotonic() - started
    return count / elapsed


def main(argv: list[str]) -> int:
    match argv:
        case ["serve", ip, port]:
            serve(ip, int(port))
        case ["measure", ip, port, seconds]:
            figures = {
                "bulk_gbps": bulk_gbps(ip, int(port), float(seconds)),
                "small_msgs_per_s": small_msgs_per_s(ip, int(port), float(seconds)),
            }
            print(json.dumps(figures))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
