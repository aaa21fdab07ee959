"""The bpf() calls the running agent makes, through libbpf (Debian `libbpf1`).

Compiling needs bcc and LLVM, about 140 MiB of the agent's memory once loaded; the agent
compiles in a short-lived child (`steer.node.bpfbuild`) and does everything else here:
open pins, attach and detach, read and write maps. libbpf is a few hundred KiB.

libbpf 1.x returns a negative error code and also sets errno, so callers test `< 0`
(or `!= 0`) and read the reason from `ctypes.get_errno()`.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
from collections.abc import Iterator
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger("steer.bpf")


class AttachType(IntEnum):
    """`enum bpf_attach_type` from the kernel's UAPI (stable numbers)."""

    CGROUP_SOCK_OPS = 3
    SK_MSG_VERDICT = 7
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_GETSOCKOPT = 21
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30


@cache
def _lib() -> Any:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    signatures: dict[str, list[Any]] = {
        "bpf_obj_get": [ct.c_char_p],
        "bpf_obj_pin": [ct.c_int, ct.c_char_p],
        "bpf_prog_attach": [ct.c_int, ct.c_int, ct.c_int, ct.c_uint],
        "bpf_prog_detach2": [ct.c_int, ct.c_int, ct.c_int],
        "bpf_map_lookup_elem": [ct.c_int, ct.c_void_p, ct.c_void_p],
        "bpf_map_update_elem": [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64],
        "bpf_map_delete_elem": [ct.c_int, ct.c_void_p],
        "bpf_map_get_next_key": [ct.c_int, ct.c_void_p, ct.c_void_p],
        "bpf_map_lookup_batch": [
            ct.c_int,
            ct.c_void_p,
            ct.c_void_p,
            ct.c_void_p,
            ct.c_void_p,
            ct.POINTER(ct.c_uint32),
            ct.c_void_p,
        ],
        "libbpf_num_possible_cpus": [],
        "bpf_obj_get_info_by_fd": [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ct.c_int
    return lib


def obj_get(path: Path) -> int:
    return int(_lib().bpf_obj_get(str(path).encode()))


def obj_pin(fd: int, path: Path) -> int:
    return int(_lib().bpf_obj_pin(fd, str(path).encode()))


def prog_attach(prog_fd: int, target_fd: int, attach_type: AttachType, flags: int) -> int:
    return int(_lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags))


def prog_detach(prog_fd: int, target_fd: int, attach_type: AttachType) -> int:
    return int(_lib().bpf_prog_detach2(prog_fd, target_fd, attach_type))


def lookup(fd: int, key: Any, value: Any) -> int:
    return int(_lib().bpf_map_lookup_elem(fd, key, value))


def update(fd: int, key: Any, value: Any, flags: int) -> int:
    return int(_lib().bpf_map_update_elem(fd, key, value, flags))


def delete(fd: int, key: Any) -> int:
    return int(_lib().bpf_map_delete_elem(fd, key))


def next_key(fd: int, key: Any, following: Any) -> int:
    return int(_lib().bpf_map_get_next_key(fd, key, following))


class MapInfo(ct.Structure):
    """The head of `struct bpf_map_info`; the kernel fills as much as the caller asks."""

    _fields_ = (
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    )


def map_info(fd: int) -> MapInfo | None:
    info = MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if _lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        return None
    return info


# `enum bpf_map_type` values whose maps the kernel can read in batches.
_BATCHED_TYPES = frozenset({1, 9})  # BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH
_BATCH = 1024


def count_entries(fd: int) -> int | None:
    """How many entries a map holds, in time proportional to that count (not to its
    capacity): hash maps in batches of 1,024, others key by key. None if unreadable."""
    info = map_info(fd)
    if info is None:
        return None
    if info.type in _BATCHED_TYPES:
        counted = 0
        for batch in _batches(fd, info.key_size, info.value_size):
            if batch is None:
                break
            counted += batch[0]
        else:
            return counted
    return _count_keys(fd, info.key_size, info.max_entries)


def read_batches(fd: int) -> Iterator[tuple[int, bytes, bytes]]:
    """A hash map's entries a batch (up to 1,024) at a time: (how many, their keys, their
    values), each packed end to end. Raises OSError where the map cannot be read so."""
    info = map_info(fd)
    if info is None or info.type not in _BATCHED_TYPES:
        raise OSError(errno.EINVAL, "not a hash map this process can read")
    for batch in _batches(fd, info.key_size, info.value_size):
        if batch is None:
            raise OSError(ct.get_errno(), "reading a batch failed")
        yield batch


def _batches(fd: int, key_size: int, value_size: int) -> Iterator[tuple[int, bytes, bytes] | None]:
    """A hash map's entries a batch at a time, as (how many, their keys, their values);
    None (and the end) where the kernel refuses a batch."""
    keys = ct.create_string_buffer(key_size * _BATCH)
    values = ct.create_string_buffer(value_size * _BATCH)
    # The batch token of a hash map is a bucket index (u32); key-sized is always enough.
    tokens = [ct.create_string_buffer(max(key_size, 8)) for _ in range(2)]
    position: Any = None
    while True:
        count = ct.c_uint32(_BATCH)
        following = tokens[0] if position is not tokens[0] else tokens[1]
        result = _lib().bpf_map_lookup_batch(
            fd, position, following, keys, values, ct.byref(count), None
        )
        # ENOENT: the walk is done (the last batch may still carry entries).
        if result != 0 and ct.get_errno() != errno.ENOENT:
            yield None
            return
        read = count.value
        yield read, keys.raw[: read * key_size], values.raw[: read * value_size]
        if result != 0:
            return
        position = following


def _count_keys(fd: int, key_size: int, max_entries: int) -> int | None:
    """Key by key. A key deleted under the walk restarts it from the first key, so a map
    that changes while it is read can be over-counted: the count stops at the map's
    capacity rather than run on."""
    keys = [ct.create_string_buffer(max(key_size, 1)) for _ in range(2)]
    total = 0
    previous: Any = None
    while total < max_entries:
        following = keys[total % 2]
        if _lib().bpf_map_get_next_key(fd, previous, following) != 0:
            return total if ct.get_errno() == errno.ENOENT else None
        total += 1
        previous = following
    return total


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key."""
    return int(_lib().libbpf_num_possible_cpus())
