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

from steer.node import libbpf, observe
from steer.node.bpfbuild import _bcc
from steer.node.bpfmaps import FLOW_LIVE, FLOW_OPENED, Flow, FlowEnd, FlowEvent
from steer.node.kernel import ensure_bpffs
from steer.node.observe import FlowReader, NodeView, Openers
from steer.node.ringbuf import RingReader
from tests.privileged.test_map_fill import LRU_HASH, create_map

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


# A writer of numbered records of 12 bytes (padded to 16 in the ring, with their 8-byte
# header 24), every third one reserved and then discarded: the reader must skip those,
# keep the order, and read across the end of a one-page ring many times over.
NUMBERED = """
BPF_RINGBUF_OUTPUT(ring, 1);
BPF_ARRAY(next, u32, 1);
int write_numbered(struct __sk_buff *skb) {
    int zero = 0;
    u32 *counter = next.lookup(&zero);
    if (!counter)
        return 0;
    u32 number = *counter;  /* one sender, one packet at a time */
    *counter = number + 1;
    struct { u32 number; u8 filler[8]; } *record = ring.ringbuf_reserve(12);
    if (!record)
        return 0;
    record->number = number;
    if (number % 3 == 0)
        ring.ringbuf_discard(record, 0);
    else
        ring.ringbuf_submit(record, 0);
    return 0;
}
"""


def test_the_reader_keeps_order_across_the_rings_end_and_skips_discarded_records() -> None:
    bcc = _bcc()
    module = bcc.BPF(text=NUMBERED.encode())
    program = module.load_func(b"write_numbered", bcc.BPF.SOCKET_FILTER)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reader = RingReader(module[b"ring"].map_fd)
    # One CPU sends, so one CPU runs the filter: its counter is not atomic.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        receiver.bind(("127.0.0.1", 0))
        receiver.setsockopt(socket.SOL_SOCKET, 50, program.fd)  # SO_ATTACH_BPF
        assert reader.read() == []
        assert not reader.wait(0)
        numbers: list[int] = []
        # 4,096 bytes hold 170 records of 24: 30 rounds of 60 wrap the ring ~10 times.
        for round_ in range(1, 31):
            for _ in range(60):
                sender.sendto(b"x", receiver.getsockname())  # dropped by the filter
            # Loopback delivery can be deferred to ksoftirqd: read until the round is in.
            expected = [n for n in range(60 * round_) if n % 3]
            deadline = time.monotonic() + 10
            while len(numbers) < len(expected) and time.monotonic() < deadline:
                reader.wait(1)
                for record in reader.read():
                    assert len(record) == 12
                    numbers.append(int.from_bytes(record[:4], "little"))
            assert numbers == expected
        assert not reader.wait(0)
    finally:
        os.sched_setaffinity(0, affinity)
        reader.close()
        sender.close()
        receiver.close()
        module.cleanup()


def test_a_flow_open_long_is_told_once_while_its_entry_lives(pin: Path) -> None:
    """The reader tells of each flow in steer_flows open for `live_after_s`, once: not a
    young one, not one whose connect() has not chosen its address yet, and again only for
    a new flow under the same cookie (its entry went, and came back)."""
    flows = create_map(LRU_HASH, 8, 64, value_size=ct.sizeof(Flow))
    told: list[list[bytes]] = []
    reader = FlowReader(
        pin,
        lambda events: None,
        NodeView,
        Openers(),
        on_live=lambda items: told.append([item[1] for item in items]),
        live_after_s=1.0,
    )
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def put(cookie: int, started_ns: int, port: int) -> ct.c_uint64:
        key = ct.c_uint64(cookie)
        flow = Flow(start_ns=started_ns, tgid=cookie, local_ip=0x0100000A, local_port=port)
        assert libbpf.update(flows, ct.byref(key), ct.byref(flow), 0) == 0
        return key

    try:
        assert libbpf.obj_pin(flows, pin.parent / "steer_flows") == 0
        old = put(1, now - 3_000_000_000, 40001)
        put(2, now, 40002)  # young
        put(3, now - 3_000_000_000, 0)  # connect() not there yet
        reader.tell_live()
        reader.tell_live()
        assert len(told) == 1 and len(told[0]) == 1, told
        event = FlowEvent.from_buffer_copy(told[0][0])
        assert (event.cookie, event.flow.tgid, event.end.src_port) == (1, 1, 40001)
        assert (event.end.kind, event.end.bytes_sent) == (FLOW_LIVE, 0)
        assert event.end.at_ns >= now
        # Closed (its entry deleted), then a new flow under the same cookie.
        assert libbpf.delete(flows, ct.byref(old)) == 0
        reader.tell_live()
        put(1, now - 2_000_000_000, 40009)
        reader.tell_live()
        assert len(told) == 2 and FlowEvent.from_buffer_copy(told[1][0]).end.src_port == 40009
    finally:
        os.close(flows)


def test_open_flows_are_told_a_thousand_a_read_and_never_from_a_stale_layout(
    pin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of long flows is told over several reads; a steer_flows of an older build
    (its values another size) is not read at all until a sync replaces it."""
    monkeypatch.setattr(observe, "_LIVE_PER_SCAN", 2)
    told: list[int] = []
    reader = FlowReader(
        pin,
        lambda events: None,
        NodeView,
        Openers(),
        on_live=lambda items: told.append(len(items)),
        live_after_s=1.0,
    )
    stale = create_map(LRU_HASH, 8, 64, value_size=ct.sizeof(Flow) - 8)
    try:
        key, value = ct.c_uint64(1), ct.create_string_buffer(ct.sizeof(Flow) - 8)
        assert libbpf.update(stale, ct.byref(key), value, 0) == 0
        assert libbpf.obj_pin(stale, pin.parent / "steer_flows") == 0
        reader.tell_live()
        assert told == []
    finally:
        os.close(stale)
        (pin.parent / "steer_flows").unlink()
    flows = create_map(LRU_HASH, 8, 64, value_size=ct.sizeof(Flow))
    try:
        assert libbpf.obj_pin(flows, pin.parent / "steer_flows") == 0
        old = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - 3_000_000_000
        for cookie in (1, 2, 3):
            key = ct.c_uint64(cookie)
            flow = Flow(start_ns=old, local_ip=0x0100000A, local_port=40000 + cookie)
            assert libbpf.update(flows, ct.byref(key), ct.byref(flow), 0) == 0
        for _ in range(3):
            reader.tell_live()
        assert told == [2, 1]
    finally:
        os.close(flows)
