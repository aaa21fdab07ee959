"""A `NodeKernel` that records every call instead of making it, and keeps just enough
state (steer's chains and jumps, map entries, attachments, conntrack flows) for the
datapaths' decisions to play out as they would on a real node.

It serves `steer agent --dry-run` (the calls a sync would make, on any machine, without
root) and the golden tests of the agent's decisions. Failures can be injected where the
real kernel can fail: the BPF build, a restore, a map update.
"""

from __future__ import annotations

import ctypes as ct
import re
import socket
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from steer.node.bpfbuild import BpfError
from steer.node.bpfmaps import PolicyKey, SegmentVal, ip_from_be
from steer.node.conntrack import Flow
from steer.node.iptables import IptablesError
from steer.render.iptables import Jump, KernelState, Ruleset

K = TypeVar("K", bound=Any)
# Fields that hold an IPv4 address in network order, and ports in network order.
_IP_FIELDS = frozenset({"ip", "addr", "envoy_ip", "client_ip"})
_BE_PORT_FIELDS = frozenset({"port_be"})
_INSERT = re.compile(r"^-I (\S+) \d+ .*-j (\S+)")
_DELETE = re.compile(r"^-D (\S+) .*-j (\S+)")


def describe(value: Any) -> str:
    """A ctypes key or value as a readable, stable line: addresses as dotted quads,
    unused port segments (lo > hi) and padding left out."""
    if isinstance(value, ct._SimpleCData):
        return str(value.value)
    if isinstance(value, SegmentVal):
        return f"{value.lo}-{value.hi}:{value.verdict}"
    parts = []
    for name, _ in value._fields_:
        if name == "pad":
            continue
        item = getattr(value, name)
        if name in _IP_FIELDS:
            text = str(ip_from_be(item))
        elif isinstance(value, PolicyKey) and name == "slot":
            # Big-endian, so that the LPM trie's prefix runs over slot then address.
            text = str(int.from_bytes(item.to_bytes(4, "little"), "big"))
        elif name in _BE_PORT_FIELDS:
            text = str(socket.ntohs(item))
        elif isinstance(item, ct.Array):
            used = [s for s in item if not (isinstance(s, SegmentVal) and s.lo > s.hi)]
            text = "[" + " ".join(describe(s) for s in used) + "]"
        else:
            text = str(item)
        parts.append(f"{name}={text}")
    return "{" + " ".join(parts) + "}"


@dataclass
class RecordingKernel:
    """Records calls in `calls`, one line each. Seed `flows`, `unmarked` and
    `origdst` with live connections; set the `fail_*` fields to inject errors."""

    calls: list[str] = field(default_factory=list)
    chains: dict[str, set[str]] = field(default_factory=dict)
    jumps: set[Jump] = field(default_factory=set)
    chains6: dict[str, set[str]] = field(default_factory=dict)
    jumps6: set[Jump] = field(default_factory=set)
    flows: list[Flow] = field(default_factory=list)
    unmarked: list[Flow] = field(default_factory=list)
    maps: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    attached: set[tuple[str, str]] = field(default_factory=set)
    pinned: bool = False
    fail_build: str | None = None
    fail_restore: str | None = None
    fail_update: str | None = None
    cookie: int = 4242
    # iptables_state() calls: what a change reads before it writes.
    state_reads: int = 0

    def _record(self, line: str) -> None:
        self.calls.append(line)

    # --- iptables -------------------------------------------------------------------------
    def iptables_state(self, *, ipv6: bool = False) -> KernelState:
        self.state_reads += 1
        held = self.chains6 if ipv6 else self.chains
        chains = {table: frozenset(names) for table, names in held.items()}
        return KernelState(chains=chains, jumps=frozenset(self.jumps6 if ipv6 else self.jumps))

    def iptables_fingerprint(self, *, ipv6: bool = False) -> bytes | None:
        chains, jumps = (self.chains6, self.jumps6) if ipv6 else (self.chains, self.jumps)
        held = (sorted((t, sorted(names)) for t, names in chains.items()), sorted(map(repr, jumps)))
        return repr(held).encode()

    def iptables_restore(self, text: str, *, ipv6: bool = False) -> None:
        binary = "ip6tables" if ipv6 else "iptables"
        self._record(f"{binary}-restore --noflush")
        self.calls += [f"  {line}" for line in text.splitlines()]
        if self.fail_restore is not None:
            raise IptablesError(f"{binary}-legacy-restore failed: {self.fail_restore}")
        chains, jumps = (self.chains6, self.jumps6) if ipv6 else (self.chains, self.jumps)
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chains.setdefault(table, set()).add(line[1:].split(" ", 1)[0])
            elif line.startswith("-X "):
                chains.get(table, set()).discard(line[3:])
            elif match := _INSERT.match(line):
                jumps.add(Jump(table, match.group(1), match.group(2)))
            elif match := _DELETE.match(line):
                jumps.discard(Jump(table, match.group(1), match.group(2)))

    def iptables_verify(
        self, ruleset: Ruleset, chains: Mapping[str, tuple[str, ...]], *, ipv6: bool = False
    ) -> None:
        read = sorted(f"{table}/{c}" for table, names in chains.items() for c in names)
        self._record(f"{'ip6tables' if ipv6 else 'iptables'} read-back {len(read)} chains")

    # --- conntrack ------------------------------------------------------------------------
    @contextmanager
    def one_conntrack_listing(self) -> Iterator[None]:
        yield

    def conntrack_flows(
        self,
        *,
        marked: bool = True,
        sources: Collection[IPv4Address] | None = None,
        destinations: Collection[IPv4Address] | None = None,
    ) -> list[Flow]:
        held = self.flows if marked else self.unmarked
        if sources is None and destinations is None:
            self._record(f"conntrack dump {'marked' if marked else 'unmarked'}")
            return list(held)
        src, dst = sorted(sources or ()), sorted(destinations or ())
        self._record(
            f"conntrack dump {'marked' if marked else 'unmarked'}"
            f" from {[str(a) for a in src]} to {[str(a) for a in dst]}"
        )
        return [f for f in held if f.src in src or f.dst in dst]

    def conntrack_delete(self, flows: Sequence[Flow]) -> list[Flow]:
        for flow in flows:
            self._record(
                f"conntrack delete {flow.src}:{flow.sport} -> {flow.dst}:{flow.dport} "
                f"(verdict {flow.verdict})"
            )
        self.flows = [f for f in self.flows if f not in flows]
        return list(flows)

    # --- sockets --------------------------------------------------------------------------
    def destroy_socket(self, netns: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
        self._record(f"ss -K in {netns}: {local[0]}:{local[1]} -> {remote[0]}:{remote[1]}")

    # --- BPF ------------------------------------------------------------------------------
    def bpf_open_pins(self, pin_dir: Path) -> bool:
        self._record(f"bpf open pins {pin_dir}")
        return self.pinned

    def bpf_build(self, pin_dir: Path) -> None:
        self._record(f"bpf build into {pin_dir}")
        if self.fail_build is not None:
            raise BpfError(self.fail_build)
        self.pinned = True

    def bpf_pins_present(self, pin_dir: Path) -> bool:
        # The recorded node's pins, never the host's: goldens must not depend on a lab
        # running on the same machine.
        return self.pinned

    def bpf_close(self) -> None:
        self._record("bpf close")

    def bpf_remove_pins(self, pin_dir: Path) -> None:
        self._record(f"bpf remove pins {pin_dir}")
        self.pinned = False
        self.maps.clear()

    def bpf_attach(self, cgroup: str, program: str) -> None:
        self._record(f"bpf attach {program} to {cgroup}")
        self.attached.add((cgroup, program))

    def bpf_detach(self, cgroup: str, program: str) -> None:
        self._record(f"bpf detach {program} from {cgroup}")
        self.attached.discard((cgroup, program))

    def bpf_update(self, map_name: str, key: Any, value: Any) -> None:
        shown = str(ip_from_be(key.value)) if map_name == "steer_podips" else describe(key)
        self._record(f"bpf update {map_name} {shown} = {describe(value)}")
        if self.fail_update is not None:
            raise BpfError(f"updating {map_name}: {self.fail_update}")
        self.maps.setdefault(map_name, {})[bytes(key)] = bytes(value)

    def bpf_delete(self, map_name: str, key: Any) -> None:
        if self.maps.get(map_name, {}).pop(bytes(key), None) is not None:
            self._record(f"bpf delete {map_name} {describe(key)}")

    def bpf_lookup(self, map_name: str, key: Any, value: Any) -> bool:
        found = self.maps.get(map_name, {}).get(bytes(key))
        if found is None:
            return False
        ct.memmove(ct.addressof(value), found, len(found))
        return True

    def bpf_lookup_percpu(self, map_name: str, key: Any, value_type: type[K]) -> list[K]:
        return [value_type()]

    def bpf_keys(self, map_name: str, key_type: type[K]) -> list[K]:
        return [key_type.from_buffer_copy(k) for k in self.maps.get(map_name, {})]

    def bpf_count(self, map_name: str) -> int | None:
        return len(self.maps.get(map_name, {}))

    def cgroup_id(self, path: str) -> int:
        # Stable across runs, so goldens do not depend on inode numbers.
        return zlib.crc32(path.encode())

    def netns_cookie(self) -> int:
        return self.cookie


if TYPE_CHECKING:
    from steer.node.kernel import NodeKernel

    _CONFORMS: type[NodeKernel] = RecordingKernel
