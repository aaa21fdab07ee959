"""The agent's flow-event reader reads what was written before it came, and follows the
ring buffer's pin: when the datapath rebuilds its BPF objects (a stale pin from an older
build, an unload and load), the programs write to a new ring, and a reader left on the old
one would go silent for good."""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from steer.node import libbpf
from steer.node.bpfbuild import _bcc
from steer.node.bpfmaps import FLOW_OPENED, Flow, FlowEnd, FlowEvent
from steer.node.kernel import ensure_bpffs
from steer.node.observe import FlowReader, NodeView, Openers

pytestmark = pytest.mark.privileged

# A socket filter that writes one "connection opened" record per packet it sees, with its
# writer's marker as the opener's pid: a real kernel writer, told apart per map.
WRITER = """
BPF_RINGBUF_OUTPUT(ring, 1);
int write_record(struct __sk_buff *skb) {
    struct { u8 bytes[%(size)d]; } record = {};
    u32 marker = %(marker)d;
    __builtin_memcpy(&record.bytes[%(tgid)d], &marker, sizeof(marker));
    record.bytes[%(kind)d] = %(opened)d;
    ring.ringbuf_output(&record, sizeof(record), 0);
    return 0;
}
"""


class Writer:
    """One ring buffer and the program that fills it; `send()` makes one record."""

    def __init__(self, marker: int) -> None:
        bcc = _bcc()
        offsets = {
            "size": ct.sizeof(FlowEvent),
            "marker": marker,
            "tgid": FlowEvent.flow.offset + Flow.tgid.offset,
            "kind": FlowEvent.end.offset + FlowEnd.kind.offset,
            "opened": FLOW_OPENED,
        }
        self.module = bcc.BPF(text=(WRITER % offsets).encode())
        program = self.module.load_func(b"write_record", bcc.BPF.SOCKET_FILTER)
        self.ring_fd: int = self.module[b"ring"].map_fd
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.receiver.bind(("127.0.0.1", 0))
        so_attach_bpf = 50
        self.receiver.setsockopt(socket.SOL_SOCKET, so_attach_bpf, program.fd)

    def send(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", self.receiver.getsockname())

    def close(self) -> None:
        self.receiver.close()
        self.module.cleanup()


@pytest.fixture
def pin() -> Iterator[Path]:
    ensure_bpffs()
    directory = Path(f"/sys/fs/bpf/steer-test-ring-{os.getpid()}")
    directory.mkdir()
    try:
        yield directory / "steer_events"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_reader_moves_to_the_ring_that_replaced_its_pin(pin: Path) -> None:
    first, second = Writer(11), Writer(22)
    openers = Openers()
    seen: list[int] = []
    lock = threading.Lock()

    def remember(source: str, opener: tuple[int, str]) -> None:
        with lock:
            seen.append(opener[0])

    openers.remember = remember  # type: ignore[method-assign]
    reader = FlowReader(pin, lambda events: None, NodeView, openers)
    try:
        assert libbpf.obj_pin(first.ring_fd, pin) == 0
        # Written before the reader opens the ring: the kernel sends no wake-up for it (it
        # wakes a reader that had caught up), so only reading on opening finds it.
        first.send()
        reader.start()
        wait_for(lambda: 11 in seen, "the record written before the reader came")
        pin.unlink()
        assert libbpf.obj_pin(second.ring_fd, pin) == 0
        # Records written to the new ring reach the reader, without a restart.
        deadline = time.monotonic() + 10
        while 22 not in seen:
            assert time.monotonic() < deadline, f"still reading the replaced ring: {seen}"
            second.send()
            time.sleep(0.3)
    finally:
        reader.stop()
        first.close()
        second.close()
