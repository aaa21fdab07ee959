"""The map fill gauges count what the kernel holds: every map type steer can fill, read in
batches where the kernel offers them (hash, LRU) and key by key elsewhere (LPM trie),
across batch boundaries, and after deletions."""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from steer.node import libbpf

pytestmark = pytest.mark.privileged

HASH, LRU_HASH, LPM_TRIE = 1, 9, 11
BPF_F_NO_PREALLOC = 1


class _CreateOpts(ct.Structure):
    _fields_ = (
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
    )


def create_map(
    map_type: int, key_size: int, max_entries: int, flags: int = 0, value_size: int = 8
) -> int:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_map_create.restype = ct.c_int
    opts = _CreateOpts(sz=ct.sizeof(_CreateOpts), map_flags=flags)
    fd = lib.bpf_map_create(
        map_type, b"steer_test", key_size, value_size, max_entries, ct.byref(opts)
    )
    assert fd >= 0, f"bpf_map_create: errno {ct.get_errno()}"
    return int(fd)


@pytest.fixture
def maps() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def _fill(fd: int, keys: list[bytes]) -> None:
    value = ct.c_uint64(7)
    for key in keys:
        buffer = ct.create_string_buffer(key, len(key))
        assert libbpf.update(fd, buffer, ct.byref(value), 0) == 0


@pytest.mark.parametrize("map_type", [HASH, LRU_HASH])
def test_hash_maps_are_counted_across_batches(maps: list[int], map_type: int) -> None:
    fd = create_map(map_type, 4, 8192)
    maps.append(fd)
    assert libbpf.count_entries(fd) == 0
    keys = [n.to_bytes(4, "little") for n in range(2500)]  # over two batches of 1,024
    _fill(fd, keys)
    assert libbpf.count_entries(fd) == 2500
    for key in keys[:100]:
        libbpf.delete(fd, ct.create_string_buffer(key, 4))
    assert libbpf.count_entries(fd) == 2400
    read = list(libbpf.read_batches(fd))
    # A batch ends with a whole bucket of the hash: up to 1,024 entries each.
    counts = [count for count, _, _ in read]
    assert sum(counts) == 2400 and len(counts) >= 3 and max(counts) <= 1024
    packed_keys = b"".join(batch_keys for _, batch_keys, _ in read)
    assert sorted(packed_keys[i : i + 4] for i in range(0, 2400 * 4, 4)) == sorted(keys[100:])
    assert b"".join(values for _, _, values in read) == (7).to_bytes(8, "little") * 2400


def test_an_lpm_trie_is_counted_key_by_key(maps: list[int]) -> None:
    # steer_policy's shape: a prefix length, then the data.
    fd = create_map(LPM_TRIE, 8, 1024, BPF_F_NO_PREALLOC)
    maps.append(fd)
    keys = [(24).to_bytes(4, "little") + bytes([10, n // 256, n % 256, 0]) for n in range(300)]
    _fill(fd, keys)
    assert libbpf.count_entries(fd) == 300


def test_an_unreadable_descriptor_is_none_not_a_crash() -> None:
    with Path(os.devnull).open() as handle:
        assert libbpf.count_entries(handle.fileno()) is None
        with pytest.raises(OSError):
            next(libbpf.read_batches(handle.fileno()))
