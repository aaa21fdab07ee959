"""A BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`) read straight from its memory map.

libbpf's `ring_buffer__poll` calls back into Python once per record; through ctypes that
callback cost more than everything the agent then did with a flow record, at ten thousand
short connections a second. The ring's memory layout is kernel ABI
(Documentation/bpf/ringbuf.rst, kernel/bpf/ringbuf.c), so the reader maps it and hands over
each batch of records as one list:

    page 0 (read-write)      the consumer position, which only the reader advances
    page 1 (read-only)       the producer position, which the kernel advances
    pages 2.. (read-only)    the data area, mapped twice in a row, so that a record that
                             wraps around the end is contiguous in the mapping

Each record starts with an 8-byte header: its length (bit 31: still being written; bit 30:
discarded) and a page offset the reader does not need; records are 8-byte aligned. The
reader relies on x86-64's ordering (the only architecture steer runs on; libbpf uses
acquire and release barriers, which x86-64's plain loads and stores already are): the
producer position is read before the records it covers, and the consumer position is
written after the records it frees have been copied out.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os
import select
import struct
from contextlib import ExitStack

from steer.node import libbpf

_BUSY = 1 << 31
_DISCARDED = 1 << 30
_HEADER = struct.Struct("<I")
_HEADER_SIZE = 8
_POSITION = struct.Struct("<Q")
# Within one long read, hand the space read back to the kernel every this many bytes, so
# writers are not refused room that has been read already.
_RELEASE_BYTES = 64 * 1024


class RingReader:
    """Reads the records of the ring buffer map `map_fd` (which the caller keeps open)."""

    def __init__(self, map_fd: int) -> None:
        info = libbpf.map_info(map_fd)
        if info is None:
            error = ct.get_errno()
            raise OSError(error, f"reading the ring buffer's info: {os.strerror(error)}")
        page = mmap.PAGESIZE
        self._size = int(info.max_entries)
        self._mask = self._size - 1
        self._data_at = page
        with ExitStack() as undo:  # a step that fails leaves nothing open
            self._consumer = mmap.mmap(
                map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            undo.callback(self._consumer.close)
            self._producer = mmap.mmap(
                map_fd, page + 2 * self._size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
            undo.callback(self._producer.close)
            self._epoll = select.epoll()
            undo.callback(self._epoll.close)
            self._epoll.register(map_fd, select.EPOLLIN)
            undo.pop_all()
        # One aligned 8-byte store: the kernel may read the position at any moment.
        self._consumer_pos: ct.c_uint64 | None = ct.c_uint64.from_buffer(self._consumer)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for records (none if some are there already): the kernel
        reports the ring readable while the producer is ahead of the consumer."""
        return bool(self._epoll.poll(timeout_s))

    def read(self) -> list[bytes]:
        """Every committed record, oldest first; the reader stops at one still being written
        (the records after it wait for the next read, in order)."""
        position = self._consumer_pos
        if position is None:
            raise OSError("the ring buffer reader is closed")
        records: list[bytes] = []
        mapped, base, mask, unpack_header = (
            self._producer,
            self._data_at,
            self._mask,
            _HEADER.unpack_from,
        )
        consumer = position.value
        producer = _POSITION.unpack_from(mapped, 0)[0]
        released = consumer
        while consumer < producer:
            start = base + (consumer & mask)
            (length,) = unpack_header(mapped, start)
            if length & _BUSY:
                break
            size = length & ~_DISCARDED
            if not length & _DISCARDED:
                records.append(mapped[start + _HEADER_SIZE : start + _HEADER_SIZE + size])
            consumer += (size + _HEADER_SIZE + 7) & ~7
            if consumer - released >= _RELEASE_BYTES:
                position.value = released = consumer
        position.value = consumer
        return records

    def close(self) -> None:
        """Unmap the ring; safe to call again."""
        self._epoll.close()
        self._consumer_pos = None  # a ctypes view keeps the map exported: close() refuses
        self._producer.close()
        self._consumer.close()
