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
discarded) and a page offset the reader does not need; records are 8-byte aligned. x86 and
arm64 do not reorder the loads and stores below in ways that matter here: the producer
position is read before the records it covers, and the consumer position is written after
the records it frees have been copied out.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os
import select
import struct

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
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._producer = mmap.mmap(
                map_fd, page + 2 * self._size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError:
            self._consumer.close()
            raise
        # One aligned 8-byte store: the kernel may read the position at any moment.
        self._consumer_pos = ct.c_uint64.from_buffer(self._consumer)
        self._data_at = page
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for records (none if some are there already): the kernel
        reports the ring readable while the producer is ahead of the consumer."""
        return bool(self._epoll.poll(timeout_s))

    def read(self) -> list[bytes]:
        """Every committed record, oldest first; the reader stops at one still being written
        (the records after it wait for the next read, in order)."""
        records: list[bytes] = []
        mapped, base, mask, unpack_header = (
            self._producer,
            self._data_at,
            self._mask,
            _HEADER.unpack_from,
        )
        consumer = self._consumer_pos.value
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
                self._consumer_pos.value = released = consumer
        self._consumer_pos.value = consumer
        return records

    def close(self) -> None:
        self._epoll.close()
        del self._consumer_pos  # a ctypes view keeps the map exported, which close() refuses
        self._producer.close()
        self._consumer.close()
