"""A cheap fingerprint of a legacy iptables table, read with the same getsockopt calls
iptables-save makes (IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES), for the agents' drift check.

The check looks at what other tools can do to steer within seconds: delete its chains,
delete its entry jumps, put a rule ahead of one. On a node with kube-proxy's 5,000
Services the nat table holds ~15,000 rules, and reading them into python-iptables
objects costs 60-120 ms of the agent's CPU every check (~33 ms for the fingerprint, half
of it the kernel's copy of the table). The fingerprint is what such changes
alter: the table's layout (entry count, size, where each built-in chain starts and ends)
and the bytes of the built-in chains' rules, packet counters left out. While it stays as
it was at the last read that found nothing, that read still holds. The user chains' names
are in it too (a rename keeps the layout). What it cannot see (a rule swapped for one of
the same size inside a chain) is what the every-rule check, every CONTENT_CHECK_S, reads
anyway.
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import os
import socket
import struct
from functools import cache
from typing import Any

# linux/netfilter_ipv4/ip_tables.h and netfilter_ipv6/ip6_tables.h: the same numbers.
_SO_GET_INFO = 64
_SO_GET_ENTRIES = 65
_HOOKS = 5  # NF_INET_NUMHOOKS
_NAME_LEN = 32  # XT_TABLE_MAXNAMELEN
# struct ipt_getinfo: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
_INFO = struct.Struct(f"={_NAME_LEN}sI{_HOOKS}I{_HOOKS}III")
# struct ipt_get_entries: name, size, then the entries (8-byte aligned: they hold u64s).
_ENTRIES_AT = 40


class _Family:
    """Where the fields sit in an entry: after `struct ipt_ip` (84 bytes) or `struct
    ip6t_ip6` (136) come nfcache (u32), target_offset and next_offset (u16), comefrom (u32),
    then the counters (two u64, 8-byte aligned)."""

    def __init__(self, family: int, level: int, ip_size: int) -> None:
        self.family, self.level = family, level
        self.next_offset = struct.Struct("=H")
        self.next_offset_at = ip_size + 6
        self.counters_at = (ip_size + 12 + 7) & ~7


_IPV4 = _Family(socket.AF_INET, socket.IPPROTO_IP, 84)
_IPV6 = _Family(socket.AF_INET6, socket.IPPROTO_IPV6, 136)


@cache
def _libc() -> Any:
    libc = ct.CDLL(None, use_errno=True)
    libc.getsockopt.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p, ct.c_void_p]
    return libc


def _getsockopt(sock: socket.socket, level: int, option: int, buffer: bytearray) -> None:
    """getsockopt with an input buffer (the table's name), which Python's cannot pass."""
    size = ct.c_uint32(len(buffer))
    data = (ct.c_char * len(buffer)).from_buffer(buffer)
    if _libc().getsockopt(sock.fileno(), level, option, data, ct.byref(size)) != 0:
        error = ct.get_errno()
        raise OSError(error, f"reading the iptables table: {os.strerror(error)}")


def fingerprint(tables: tuple[str, ...], *, ipv6: bool = False) -> bytes:
    """The tables' fingerprint in the calling thread's network namespace; OSError if one
    cannot be read (no such table, no CAP_NET_ADMIN)."""
    family = _IPV6 if ipv6 else _IPV4
    digest = hashlib.blake2b(digest_size=16)
    with socket.socket(family.family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for table in tables:
            digest.update(_table_fingerprint(sock, family, table))
    return digest.digest()


def _table_fingerprint(sock: socket.socket, family: _Family, table: str) -> bytes:
    name = table.encode()
    info = bytearray(_INFO.size)
    info[: len(name)] = name
    _getsockopt(sock, family.level, _SO_GET_INFO, info)
    fields = _INFO.unpack(info)
    valid_hooks, hook_entry = fields[1], fields[2 : 2 + _HOOKS]
    underflow, size = fields[2 + _HOOKS : 2 + 2 * _HOOKS], fields[-1]
    # One buffer the kernel writes into and the walk reads from (nat holds ~8 MB with
    # 5,000 Services): no copy of it is made.
    request = bytearray(_ENTRIES_AT + size)
    struct.pack_into(f"={_NAME_LEN}sI", request, 0, name, size)
    # EAGAIN if the table changed size since GET_INFO: the caller reads the tables.
    _getsockopt(sock, family.level, _SO_GET_ENTRIES, request)
    with memoryview(request) as whole, whole[_ENTRIES_AT:] as entries:
        parts = [bytes(info[_NAME_LEN:]), *_user_chain_names(request)]
        for hook in range(_HOOKS):
            if valid_hooks & (1 << hook):
                parts.extend(
                    _chain_without_counters(entries, family, hook_entry[hook], underflow[hook])
                )
    return b"\0".join(parts)


# Each user chain starts with an entry whose target is ERROR, holding the chain's name
# (struct xt_error_target): the target's name padded to 29 bytes, its revision (0), then
# the chain's name. Found by a byte search rather than a walk of every entry.
_ERROR_TARGET = b"ERROR".ljust(30, b"\0")
_CHAIN_NAME_LEN = 32


def _user_chain_names(table: bytearray) -> list[bytes]:
    """The user chains' names in table order (a rename keeps the layout, not the name)."""
    names = []
    at = table.find(_ERROR_TARGET, _ENTRIES_AT)
    while at >= 0:
        start = at + len(_ERROR_TARGET)
        names.append(bytes(table[start : start + _CHAIN_NAME_LEN]))
        at = table.find(_ERROR_TARGET, start)
    return names


def _chain_without_counters(
    entries: memoryview, family: _Family, first: int, last: int
) -> list[bytes]:
    """A built-in chain's entries, from its first rule to its policy at `last`; OSError
    where an entry's length leaves the table (the kernel never hands one over)."""
    parts = []
    offset = first
    while offset <= last:
        length_at = offset + family.next_offset_at
        if length_at + family.next_offset.size > len(entries):
            raise OSError(f"an iptables entry at {offset} runs past the table")
        (length,) = family.next_offset.unpack_from(entries, length_at)
        if length < family.counters_at + 16 or offset + length > len(entries):
            raise OSError(f"an iptables entry at {offset} has a bad length ({length})")
        parts.append(entries[offset : offset + family.counters_at])
        parts.append(entries[offset + family.counters_at + 16 : offset + length])
        offset += length
    return [bytes(part) for part in parts]
