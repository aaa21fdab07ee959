"""The kernel seam: every call the agent's datapaths make into the kernel, as one protocol.

`HostKernel` makes them for real: iptables-legacy-restore and read-back, conntrack through
pyroute2, `ss -K` for sockets, bpf() through libbpf and the build child. The datapaths'
decisions (which pod goes where, which flows a change revokes, what a failed BPF load
falls back to) only ever see this protocol, so the same decisions run against
`steer.node.fakekernel.RecordingKernel`, which records the calls instead of making them:
golden tests of the exact calls without root, and `steer agent --dry-run`. This is
Istio's iptables "dependencies" stub, widened to conntrack, sockets and BPF.

Everything acts on the calling thread's network namespace, as the adapters do.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import json
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol, TypeVar

from steer.constants import BPFFS, CGROUP_SUBTREE
from steer.node import conntrack, iptables, libbpf, xtables
from steer.node.bpfbuild import (
    BUILD_ERROR,
    COMPILE_TIMEOUT_S,
    BpfError,
    attach_program,
    build_command,
    errno_message,
    tail,
)
from steer.node.bpfmaps import MAPS, PROGRAM_BY_NAME, PROGRAMS, size_mismatches
from steer.node.cgroups import cgroup2_root
from steer.node.conntrack import Flow
from steer.node.libbpf import AttachType
from steer.render.iptables import TABLES, KernelState, Ruleset

log = logging.getLogger("steer.kernel")
K = TypeVar("K", bound=Any)
SO_NETNS_COOKIE = 71
BPF_F_ALLOW_MULTI = 2
BPF_ANY = 0


class NodeKernel(Protocol):
    # --- iptables (legacy), the node's tables; ip6tables with ipv6=True ---------------------
    def iptables_state(self, *, ipv6: bool = False) -> KernelState:
        """steer's chains and entry jumps as the kernel has them."""
        ...

    def iptables_restore(self, text: str, *, ipv6: bool = False) -> None:
        """Apply restore text atomically per table; raises IptablesError."""
        ...

    def iptables_fingerprint(self, *, ipv6: bool = False) -> bytes | None:
        """A digest that changes whenever steer's chain names or entry jumps can have
        (`steer.node.xtables`), far cheaper than `iptables_state`; None if unreadable."""
        ...

    def iptables_verify(
        self, ruleset: Ruleset, chains: Mapping[str, tuple[str, ...]], *, ipv6: bool = False
    ) -> None:
        """Read the given chains back; raises IptablesError where they differ."""
        ...

    # --- conntrack ------------------------------------------------------------------------
    def conntrack_flows(
        self,
        *,
        marked: bool = True,
        sources: Collection[IPv4Address] | None = None,
        destinations: Collection[IPv4Address] | None = None,
    ) -> list[Flow]:
        """Live TCP flows with a steer verdict mark (or, `marked=False`, without one); with
        `sources`/`destinations`, only those from or to these addresses."""
        ...

    def conntrack_delete(self, flows: Sequence[Flow]) -> list[Flow]:
        """Delete the flows' entries; returns those deleted."""
        ...

    def one_conntrack_listing(self) -> AbstractContextManager[None]:
        """Inside this block, every conntrack_flows call reads the same listing of the
        table, taken at the first call: for revocation passes that run back to back
        after a change is in force (a flow set up after the listing was decided under the
        new rules, so missing it loses nothing)."""
        ...

    # --- sockets --------------------------------------------------------------------------
    def destroy_socket(self, netns: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
        """Abort one TCP socket inside a pod (SOCK_DESTROY): its owner sees ECONNABORTED."""
        ...

    # --- BPF objects ----------------------------------------------------------------------
    def bpf_open_pins(self, pin_dir: Path) -> bool:
        """Open every pinned program and map; False if any is missing. Raises BpfError if
        a pinned map's sizes differ from steer.node.bpfmaps."""
        ...

    def bpf_build(self, pin_dir: Path) -> None:
        """Compile, verify and pin into `pin_dir` (in a child); raises BpfError."""
        ...

    def bpf_pins_present(self, pin_dir: Path) -> bool:
        """Whether anything is pinned under `pin_dir` (complete or not)."""
        ...

    def bpf_close(self) -> None: ...

    def bpf_remove_pins(self, pin_dir: Path) -> None:
        """Detach any steer program still attached under steer's cgroups, remove the pins."""
        ...

    def bpf_attach(self, cgroup: str, program: str) -> None: ...

    def bpf_detach(self, cgroup: str, program: str) -> None:
        """Detach; a cgroup that is gone took its attachments with it."""
        ...

    def bpf_update(self, map_name: str, key: Any, value: Any) -> None:
        """Raises BpfError (a full map, most often)."""
        ...

    def bpf_delete(self, map_name: str, key: Any) -> None: ...

    def bpf_lookup(self, map_name: str, key: Any, value: Any) -> bool:
        """Fill `value`; False if the key is absent."""
        ...

    def bpf_lookup_percpu(self, map_name: str, key: Any, value_type: type[K]) -> list[K]: ...

    def bpf_keys(self, map_name: str, key_type: type[K]) -> list[K]: ...

    def bpf_count(self, map_name: str) -> int | None:
        """How many entries a map holds now; None if it cannot be read."""
        ...

    def cgroup_id(self, path: str) -> int:
        """The id BPF programs see for a cgroup v2 directory; 0 if it is gone."""
        ...

    def netns_cookie(self) -> int:
        """The cookie of the calling thread's network namespace (where Envoy runs)."""
        ...


def ensure_bpffs() -> None:
    """Pins need bpffs at /sys/fs/bpf; mount it the way Cilium does if it is missing."""
    with Path("/proc/mounts").open() as mounts:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in mounts):
            return
    BPFFS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)


@contextmanager
def _cgroup_fd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def steer_cgroup_roots() -> list[Path]:
    """Where steer attaches: the lab's subtree, and the kubelet's pod trees."""
    try:
        root = cgroup2_root()
    except Exception:  # no cgroup2 mount: nothing can be attached
        return []
    candidates = (root / CGROUP_SUBTREE, root / "kubepods.slice", root / "kubepods")
    return [c for c in candidates if c.exists()]


def _bpftool_cgroup_programs(root: Path) -> list[tuple[str, int, str, str]]:
    """(cgroup, prog id, attach type, name) of every program attached under `root`."""
    proc = subprocess.run(
        ["bpftool", "-j", "cgroup", "tree", str(root)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    found = []
    for entry in json.loads(proc.stdout):
        for cgroup in entry.get("cgroups", [entry]) if isinstance(entry, dict) else entry:
            for program in cgroup.get("programs", []):
                found.append(
                    (
                        cgroup["cgroup"],
                        program["id"],
                        program["attach_type"],
                        program.get("name", ""),
                    )
                )
    return found


def detach_strays(root: Path) -> int:
    """Detach every steer program attached anywhere under `root`, by name: the safety net
    for an unload after the state file was lost."""
    count = 0
    for cgroup, prog_id, attach_type, name in _bpftool_cgroup_programs(root):
        if name.startswith("steer_"):
            subprocess.run(
                ["bpftool", "cgroup", "detach", cgroup, attach_type, "id", str(prog_id)],
                check=False,
                capture_output=True,
            )
            count += 1
    return count


@dataclass
class HostKernel:
    """The real kernel. Holds the fds of the pinned BPF objects once opened."""

    prog_fds: dict[str, int] = field(default_factory=dict)
    map_fds: dict[str, int] = field(default_factory=dict)
    _listing_held: bool = False
    _listing: str | None = None

    # --- iptables -------------------------------------------------------------------------
    def iptables_state(self, *, ipv6: bool = False) -> KernelState:
        return iptables.read_state6() if ipv6 else iptables.read_state()

    def iptables_fingerprint(self, *, ipv6: bool = False) -> bytes | None:
        try:
            return xtables.fingerprint(("filter",) if ipv6 else TABLES, ipv6=ipv6)
        except OSError as exc:
            log.debug("no iptables fingerprint (%s): the drift check reads the tables", exc)
            return None

    def iptables_restore(self, text: str, *, ipv6: bool = False) -> None:
        iptables.restore(text, iptables.RESTORE6 if ipv6 else iptables.RESTORE)

    def iptables_verify(
        self, ruleset: Ruleset, chains: Mapping[str, tuple[str, ...]], *, ipv6: bool = False
    ) -> None:
        if ipv6:
            iptables.verify6(ruleset, chains)
        else:
            iptables.verify(ruleset, chains)

    # --- conntrack ------------------------------------------------------------------------
    def conntrack_flows(
        self,
        *,
        marked: bool = True,
        sources: Collection[IPv4Address] | None = None,
        destinations: Collection[IPv4Address] | None = None,
    ) -> list[Flow]:
        if self._listing_held and self._listing is None:
            self._listing = conntrack.listing()
        listing = self._listing if self._listing is not None else conntrack.listing()
        return conntrack.parse(listing, marked=marked, sources=sources, destinations=destinations)

    @contextmanager
    def one_conntrack_listing(self) -> Iterator[None]:
        self._listing_held, self._listing = True, None
        try:
            yield
        finally:
            self._listing_held, self._listing = False, None

    def conntrack_delete(self, flows: Sequence[Flow]) -> list[Flow]:
        return conntrack.delete(flows)

    # --- sockets --------------------------------------------------------------------------
    def destroy_socket(self, netns: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
        """`netns` is a named namespace (the lab) or a path such as /proc/<pid>/ns/net (a
        Kubernetes pod, found through one of its processes)."""
        enter = (
            ("nsenter", f"--net={netns}")
            if netns.startswith("/")
            else ("ip", "netns", "exec", netns)
        )
        subprocess.run(
            [
                *enter,
                *("ss", "-K", "-t", "-n"),
                *("src", f"{local[0]}:{local[1]}", "dst", f"{remote[0]}:{remote[1]}"),
            ],
            check=True,
            capture_output=True,
            timeout=5,
        )

    # --- BPF ------------------------------------------------------------------------------
    def bpf_open_pins(self, pin_dir: Path) -> bool:
        ensure_bpffs()
        names = ((p.name for p in PROGRAMS), self.prog_fds), (MAPS, self.map_fds)
        for wanted, fds in names:
            for name in wanted:
                fd = libbpf.obj_get(pin_dir / name)
                if fd < 0:
                    self.bpf_close()
                    return False
                fds[name] = fd
        problems = []
        for name, fd in self.map_fds.items():
            info = libbpf.map_info(fd)
            if info is None:
                problems.append(errno_message(f"{name}: reading its info"))
                continue
            problems += size_mismatches(name, info.key_size, info.value_size, info.max_entries)
        if problems:
            self.bpf_close()
            raise BpfError(f"pinned maps differ from steer/node/bpfmaps.py: {'; '.join(problems)}")
        return True

    def bpf_build(self, pin_dir: Path) -> None:
        ensure_bpffs()
        proc = subprocess.run(
            build_command(pin_dir),
            capture_output=True,
            text=True,
            check=False,
            timeout=COMPILE_TIMEOUT_S,
        )
        if proc.returncode != 0:
            shutil.rmtree(pin_dir, ignore_errors=True)
            _, found, error = proc.stderr.partition(BUILD_ERROR)
            raise BpfError(
                error.strip()
                if found
                else f"the BPF build failed (exit status {proc.returncode}): {tail(proc.stderr)}"
            )

    def bpf_close(self) -> None:
        for fd in (*self.prog_fds.values(), *self.map_fds.values()):
            os.close(fd)
        self.prog_fds.clear()
        self.map_fds.clear()

    def bpf_pins_present(self, pin_dir: Path) -> bool:
        return pin_dir.exists()

    def bpf_remove_pins(self, pin_dir: Path) -> None:
        for root in steer_cgroup_roots():
            detach_strays(root)
        shutil.rmtree(pin_dir, ignore_errors=True)

    def bpf_attach(self, cgroup: str, program: str) -> None:
        with _cgroup_fd(cgroup) as fd:
            attach_program(
                self.prog_fds[program], fd, PROGRAM_BY_NAME[program].attach_type, BPF_F_ALLOW_MULTI
            )

    def bpf_detach(self, cgroup: str, program: str) -> None:
        attach_type = AttachType[PROGRAM_BY_NAME[program].attach_type]
        with contextlib.suppress(FileNotFoundError), _cgroup_fd(cgroup) as fd:
            libbpf.prog_detach(self.prog_fds[program], fd, attach_type)

    def bpf_update(self, map_name: str, key: Any, value: Any) -> None:
        if libbpf.update(self.map_fds[map_name], ct.byref(key), ct.byref(value), BPF_ANY) != 0:
            raise BpfError(errno_message(f"updating {map_name} (is it full?)"))

    def bpf_delete(self, map_name: str, key: Any) -> None:
        libbpf.delete(self.map_fds[map_name], ct.byref(key))

    def bpf_lookup(self, map_name: str, key: Any, value: Any) -> bool:
        return libbpf.lookup(self.map_fds[map_name], ct.byref(key), ct.byref(value)) == 0

    def bpf_lookup_percpu(self, map_name: str, key: Any, value_type: type[K]) -> list[K]:
        values = (value_type * libbpf.possible_cpus())()
        if libbpf.lookup(self.map_fds[map_name], ct.byref(key), values) != 0:
            raise BpfError(errno_message(f"reading {map_name}"))
        return list(values)

    def bpf_count(self, map_name: str) -> int | None:
        fd = self.map_fds.get(map_name)
        return None if fd is None else libbpf.count_entries(fd)

    def bpf_keys(self, map_name: str, key_type: type[K]) -> list[K]:
        keys: list[K] = []
        following = key_type()
        previous: Any = None
        while libbpf.next_key(self.map_fds[map_name], previous, ct.byref(following)) == 0:
            keys.append(key_type.from_buffer_copy(following))
            current = key_type.from_buffer_copy(following)
            previous = ct.byref(current)
        return keys

    def cgroup_id(self, path: str) -> int:
        # cgroup v2 ids are the inode numbers of the cgroup directories.
        try:
            return Path(path).stat().st_ino
        except FileNotFoundError:
            return 0

    def netns_cookie(self) -> int:
        with socket.socket() as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return int.from_bytes(raw, "little")
