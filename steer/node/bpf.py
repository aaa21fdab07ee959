"""The eBPF datapath's kernel side: compile with bcc once, pin, attach, update maps.

Compiling runs in a short-lived child process (`steer.node.bpfbuild`), so bcc and LLVM
never stay in the agent's memory; the agent itself talks to the pins through libbpf.

Programs and maps are pinned under /sys/fs/bpf/steer/, and cgroup attachments are legacy
(not bpf_link) attachments, which outlive the process. So an agent that restarts, even
after kill -9, finds everything in place: it re-adopts the pins by path and never
recompiles unless the sources changed. Adding a pod is a map update plus an attach.

Every map key and value has a ctypes mirror here; after a compile the loader checks the
sizes against what bcc compiled, so the C and Python sides cannot drift apart.
"""

from __future__ import annotations

import ctypes as ct
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from steer.constants import BPF_PIN_DIR, CGROUP_SUBTREE, RUN_DIR
from steer.node import libbpf
from steer.node.libbpf import AttachType
from steer.render.bpf import PodPolicy

log = logging.getLogger("steer.bpf")

BPF_SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"
# Textual order matters: bcc rewrites map calls only in its main text, so headers are
# inlined ahead of the hooks rather than #included (their include guards then skip the
# #include lines in the hook files).
SOURCE_FILES = (
    "include/steer/config.h",
    "include/steer/maps.h",
    "include/steer/common.h",
    "connect4.c",
    "sockops.c",
    "skmsg.c",
    "getsockopt.c",
)
MAX_SEGMENTS = 16
MAX_PODS = 4096
BPF_F_ALLOW_MULTI = 2
BPF_ANY = 0
SO_NETNS_COOKIE = 71
CFG_SKMSG = 0x1
STATE_FILE = RUN_DIR / "bpf-state.json"
BPFFS = Path("/sys/fs/bpf")


class BpfError(RuntimeError):
    pass


# --- ctypes mirrors of bpf/include/steer/maps.h -------------------------------------------


class Cfg(ct.Structure):
    _fields_ = (
        ("envoy_ip", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("node_netns_cookie", ct.c_uint64),
    )


class PodVal(ct.Structure):
    _fields_ = (("slot", ct.c_uint32), ("ip", ct.c_uint32))


class PolicyKey(ct.Structure):
    _fields_ = (("prefixlen", ct.c_uint32), ("slot", ct.c_uint32), ("addr", ct.c_uint32))


class SegmentVal(ct.Structure):
    _fields_ = (
        ("lo", ct.c_uint16),
        ("hi", ct.c_uint16),
        ("verdict", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    )


class PolicyVal(ct.Structure):
    _fields_ = (
        ("default_verdict", ct.c_uint8),
        ("nsegments", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("seg", SegmentVal * MAX_SEGMENTS),
    )


class OrigDst(ct.Structure):
    _fields_ = (("ip", ct.c_uint32), ("port_be", ct.c_uint16), ("slot", ct.c_uint16))


class FlowKey(ct.Structure):
    _fields_ = (
        ("netns_cookie", ct.c_uint64),
        ("client_ip", ct.c_uint32),
        ("envoy_ip", ct.c_uint32),
        ("client_port", ct.c_uint16),
        ("envoy_port", ct.c_uint16),
        ("pad", ct.c_uint32),
    )


COUNTER_NAMES = (
    "redirects",
    "direct",
    "denied",
    "msgs",
    "bytes",
    "sockopt_hits",
    "sockopt_miss",
    "map_full",
)


class CountersVal(ct.Structure):
    _fields_ = tuple((name, ct.c_uint64) for name in COUNTER_NAMES)


# name -> (key type, value type); the sockhash's values are sockets, with no mirror.
MAPS: dict[str, tuple[Any, Any]] = {
    "steer_cfg": (ct.c_uint32, Cfg),
    "steer_pods": (ct.c_uint64, PodVal),
    "steer_podips": (ct.c_uint32, ct.c_uint32),
    "steer_policy": (PolicyKey, PolicyVal),
    "steer_cookie": (ct.c_uint64, OrigDst),
    "steer_origdst": (FlowKey, OrigDst),
    "steer_counters": (ct.c_uint32, CountersVal),
    "steer_sockhash": (None, None),
}


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: str
    attach_type: str | None


PROGRAMS = (
    Program("steer_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    Program("steer_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS"),
    Program("steer_skmsg", "SK_MSG", "SK_MSG_VERDICT"),
    Program("steer_sockopt", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT"),
)
POD_PROGRAMS = ("steer_connect4", "steer_sockops")
ENVOY_PROGRAMS = ("steer_sockops", "steer_sockopt")


def _ip_be(ip: IPv4Address | str) -> int:
    """An IPv4 address as the kernel stores it (network order) read as a native u32."""
    return int.from_bytes(IPv4Address(ip).packed, "little")


def _ip_from_be(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def source_text(source_dir: Path | None = None) -> str:
    directory = source_dir or BPF_SOURCE_DIR
    return "\n".join((directory / name).read_text() for name in SOURCE_FILES)


def build_hash() -> str:
    return hashlib.sha256(source_text().encode()).hexdigest()[:16]


def _bcc() -> Any:
    import bcc  # imported late, in the compiling child only: bcc brings LLVM along

    return bcc


def _errno_message(what: str) -> str:
    return f"{what}: {os.strerror(ct.get_errno())}"


def ensure_bpffs() -> None:
    """Pins need bpffs at /sys/fs/bpf; mount it the way Cilium does if it is missing."""
    with Path("/proc/mounts").open() as mounts:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in mounts):
            return
    BPFFS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)


def node_netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (where Envoy runs)."""
    with socket.socket() as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@contextmanager
def _cgroup_fd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def cgroup_id(path: str) -> int:
    """cgroup v2 ids are the inode numbers of the cgroup directories."""
    return Path(path).stat().st_ino


@dataclass
class Attachment:
    cgroup: str
    program: str

    def key(self) -> tuple[str, str]:
        return (self.cgroup, self.program)


@dataclass
class BpfDatapath:
    """Handles on the pinned programs and maps, and what is attached where."""

    pin_dir: Path = BPF_PIN_DIR
    state_file: Path = STATE_FILE
    prog_fds: dict[str, int] = field(default_factory=dict)
    map_fds: dict[str, int] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    # pod key -> slot in steer_counters and steer_policy; kept across restarts, so a pod
    # keeps its counters and an adopted policy map stays consistent.
    slots: dict[str, int] = field(default_factory=dict)
    adopted: bool = False

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    def load(cls, pin_dir: Path = BPF_PIN_DIR, state_file: Path = STATE_FILE) -> BpfDatapath:
        """Adopt the pinned objects if they come from these sources, else compile anew."""
        ensure_bpffs()
        datapath = cls(pin_dir, state_file)
        state = datapath._read_state()
        if state.get("build") == build_hash() and datapath._open_pins():
            datapath.attachments = [Attachment(**a) for a in state.get("attachments", [])]
            datapath.slots = {str(k): int(v) for k, v in state.get("slots", {}).items()}
            datapath.adopted = True
            log.debug("adopted pinned BPF objects (build %s)", state["build"])
            return datapath
        if pin_dir.exists():
            log.info("pinned BPF objects are stale or incomplete; reloading")
            cls.unload_all(pin_dir, state_file)
        datapath._compile_and_pin()
        datapath._write_state()
        return datapath

    def _compile_and_pin(self) -> None:
        """Compile, load and pin in a child process, then open what it pinned."""
        proc = subprocess.run(
            build_command(self.pin_dir),
            capture_output=True,
            text=True,
            check=False,
            timeout=COMPILE_TIMEOUT_S,
        )
        if proc.returncode != 0:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            _, found, error = proc.stderr.partition(BUILD_ERROR)
            raise BpfError(
                error.strip()
                if found
                else f"the BPF build failed (exit status {proc.returncode}): {_tail(proc.stderr)}"
            )
        if not self._open_pins():
            raise BpfError(f"the BPF build finished but its pins in {self.pin_dir} are missing")

    def _open_pins(self) -> bool:
        for names, fds in (((p.name for p in PROGRAMS), self.prog_fds), (MAPS, self.map_fds)):
            for name in names:
                fd = libbpf.obj_get(self.pin_dir / name)
                if fd < 0:
                    self.close()
                    return False
                fds[name] = fd
        return True

    def close(self) -> None:
        for fd in (*self.prog_fds.values(), *self.map_fds.values()):
            os.close(fd)
        self.prog_fds.clear()
        self.map_fds.clear()

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def _write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "build": build_hash(),
            "attachments": [a.__dict__ for a in self.attachments],
            "slots": self.slots,
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2))
        tmp.replace(self.state_file)

    # --- attachments ---------------------------------------------------------------------

    def _attach(self, cgroup: str, program: str) -> None:
        attachment = Attachment(cgroup, program)
        if attachment.key() in {a.key() for a in self.attachments}:
            return
        attach_type = next(p.attach_type for p in PROGRAMS if p.name == program) or ""
        with _cgroup_fd(cgroup) as fd:
            _attach_program(self.prog_fds[program], fd, attach_type, BPF_F_ALLOW_MULTI)
        self.attachments.append(attachment)
        self._write_state()

    def _detach(self, attachment: Attachment) -> None:
        attach_type = next(p.attach_type for p in PROGRAMS if p.name == attachment.program)
        try:
            with _cgroup_fd(attachment.cgroup) as fd:
                libbpf.prog_detach(
                    self.prog_fds[attachment.program], fd, AttachType[attach_type or ""]
                )
        except FileNotFoundError:
            pass  # the cgroup is gone, and its attachments with it
        self.attachments = [a for a in self.attachments if a.key() != attachment.key()]
        self._write_state()

    # --- node and pods -------------------------------------------------------------------

    def slot_for(self, pod_key: str) -> int:
        if pod_key not in self.slots:
            used = set(self.slots.values())
            free = next((s for s in range(1, MAX_PODS) if s not in used), None)
            if free is None:
                raise BpfError(f"all {MAX_PODS - 1} eBPF pod slots are in use")
            self.slots[pod_key] = free
            self._write_state()
        return self.slots[pod_key]

    def release_slot(self, pod_key: str) -> None:
        if self.slots.pop(pod_key, None) is not None:
            self._write_state()

    def configure(self, envoy_ip: str, netns_cookie: int, skmsg: bool) -> None:
        cfg = Cfg(_ip_be(envoy_ip), CFG_SKMSG if skmsg else 0, netns_cookie)
        self._update("steer_cfg", ct.c_uint32(0), cfg)

    def set_skmsg(self, enabled: bool) -> None:
        """Turn sk_msg on or off for connections established from now on (sockets already
        in the sockhash keep their redirect until they close)."""
        cfg = Cfg()
        if libbpf.lookup(self.map_fds["steer_cfg"], ct.byref(ct.c_uint32(0)), ct.byref(cfg)) != 0:
            raise BpfError(_errno_message("reading steer_cfg"))
        cfg.flags = (cfg.flags | CFG_SKMSG) if enabled else (cfg.flags & ~CFG_SKMSG)
        self._update("steer_cfg", ct.c_uint32(0), cfg)

    def attach_envoy(self, cgroup: str) -> None:
        for program in ENVOY_PROGRAMS:
            self._attach(cgroup, program)

    def set_pod(self, cgroup: str, slot: int, policy: PodPolicy) -> None:
        """Install or replace a pod's policy, then steer its cgroup. The policy goes in
        first, so no connect ever sees the pod without its verdicts."""
        self._write_policy(slot, policy)
        self._update("steer_podips", ct.c_uint32(_ip_be(policy.ip)), ct.c_uint32(slot))
        self._update("steer_pods", ct.c_uint64(cgroup_id(cgroup)), PodVal(slot, _ip_be(policy.ip)))
        for program in POD_PROGRAMS:
            self._attach(cgroup, program)

    def remove_pod(self, cgroup: str, slot: int, ip: str) -> None:
        """Stop steering new connects; established ones keep their sockets and go on."""
        for attachment in [a for a in self.attachments if a.cgroup == cgroup]:
            self._detach(attachment)
        self._delete("steer_pods", ct.c_uint64(_stat_ino_or_zero(cgroup)))
        self._delete("steer_podips", ct.c_uint32(_ip_be(ip)))
        self._write_policy(slot, None)

    def _write_policy(self, slot: int, policy: PodPolicy | None) -> None:
        slot_be = int.from_bytes(slot.to_bytes(4, "big"), "little")
        wanted: dict[tuple[int, int], PolicyVal] = {}  # (prefixlen, addr) -> value
        for entry in policy.prefixes if policy else ():
            value = PolicyVal(entry.default, len(entry.segments))
            for i in range(MAX_SEGMENTS):
                # Unused slots get lo > hi: connect4 walks all of them and they never match.
                seg = entry.segments[i] if i < len(entry.segments) else None
                value.seg[i] = (
                    SegmentVal(seg.lo, seg.hi, seg.verdict) if seg else SegmentVal(1, 0, 0)
                )
            key = (32 + entry.prefix.prefixlen, _ip_be(entry.prefix.network_address))
            wanted[key] = value
        for stale in self.policy_keys(slot_be):
            if (stale.prefixlen, stale.addr) not in wanted:
                self._delete("steer_policy", stale)
        for (prefixlen, addr), value in wanted.items():
            self._update("steer_policy", PolicyKey(prefixlen, slot_be, addr), value)

    def policy_keys(self, slot_be: int) -> list[PolicyKey]:
        return [k for k in self._keys("steer_policy", PolicyKey) if k.slot == slot_be]

    # --- reading -------------------------------------------------------------------------

    def counters(self, slot: int) -> dict[str, int]:
        """Per-pod counters, summed over CPUs."""
        values = (CountersVal * libbpf.possible_cpus())()
        if libbpf.lookup(self.map_fds["steer_counters"], ct.byref(ct.c_uint32(slot)), values) != 0:
            raise BpfError(_errno_message("reading steer_counters"))
        return {name: sum(getattr(v, name) for v in values) for name in COUNTER_NAMES}

    def steered_flows(self) -> list[tuple[IPv4Address, int, IPv4Address, int]]:
        """(client ip, client port, original ip, original port) of live L7 connections."""
        flows = []
        for key in self._keys("steer_origdst", FlowKey):
            value = OrigDst()
            if libbpf.lookup(self.map_fds["steer_origdst"], ct.byref(key), ct.byref(value)) == 0:
                flows.append(
                    (
                        _ip_from_be(key.client_ip),
                        key.client_port,
                        _ip_from_be(value.ip),
                        socket.ntohs(value.port_be),
                    )
                )
        return flows

    def _keys(self, name: str, key_type: type[ct.Structure]) -> list[Any]:
        keys = []
        following = key_type()
        previous: Any = None
        while libbpf.next_key(self.map_fds[name], previous, ct.byref(following)) == 0:
            keys.append(key_type.from_buffer_copy(following))
            current = key_type.from_buffer_copy(following)
            previous = ct.byref(current)
        return keys

    def _update(self, name: str, key: Any, value: Any) -> None:
        if libbpf.update(self.map_fds[name], ct.byref(key), ct.byref(value), BPF_ANY) != 0:
            raise BpfError(_errno_message(f"updating {name} (is it full?)"))

    def _delete(self, name: str, key: Any) -> None:
        libbpf.delete(self.map_fds[name], ct.byref(key))

    # --- unload --------------------------------------------------------------------------

    @classmethod
    def unload_all(cls, pin_dir: Path = BPF_PIN_DIR, state_file: Path = STATE_FILE) -> None:
        """Detach every recorded attachment and remove every pin. No iptables rule is
        touched. Works from the pins and the state file alone, after any crash."""
        datapath = cls(pin_dir, state_file)
        state = datapath._read_state()
        if pin_dir.exists() and datapath._open_pins():
            for attachment in [Attachment(**a) for a in state.get("attachments", [])]:
                datapath._detach(attachment)
            datapath.close()
        for root in lab_cgroup_roots():
            detach_strays(root)
        shutil.rmtree(pin_dir, ignore_errors=True)
        state_file.unlink(missing_ok=True)


def lab_cgroup_roots() -> list[Path]:
    """Where steer attaches: the lab's subtree, and the kubelet's pod trees."""
    from steer.node.cgroups import cgroup2_root

    try:
        root = cgroup2_root()
    except Exception:  # no cgroup2 mount: nothing can be attached
        return []
    candidates = (root / CGROUP_SUBTREE, root / "kubepods.slice", root / "kubepods")
    return [c for c in candidates if c.exists()]


def _stat_ino_or_zero(path: str) -> int:
    try:
        return cgroup_id(path)
    except FileNotFoundError:
        return 0


BUILD_ERROR = "steer-bpf-build: "
COMPILE_TIMEOUT_S = 300


def build_command(pin_dir: Path) -> list[str]:
    """The child that compiles the current sources and pins the result in `pin_dir`."""
    source = str(BPF_SOURCE_DIR)
    return [sys.executable, "-m", "steer.node.bpfbuild", "--source", source, "--pins", str(pin_dir)]


def _attach_program(prog_fd: int, target_fd: int, attach_type: str, flags: int) -> None:
    if libbpf.prog_attach(prog_fd, target_fd, AttachType[attach_type], flags) != 0:
        raise BpfError(_errno_message(f"attaching as {attach_type}"))


def _pin(fd: int, path: Path) -> None:
    if libbpf.obj_pin(fd, path) != 0:
        raise BpfError(_errno_message(f"pinning {path}"))


def _check_layouts(module: Any) -> None:
    for name, (key_type, value_type) in MAPS.items():
        if key_type is None:
            continue
        table = module[name.encode()]
        # Per-CPU tables expose the per-CPU array as Leaf and one CPU's value as sLeaf.
        got = (ct.sizeof(table.Key), ct.sizeof(getattr(table, "sLeaf", table.Leaf)))
        want = (ct.sizeof(key_type), ct.sizeof(value_type))
        if got != want:
            raise BpfError(f"{name}: C layout {got} differs from steer/node/bpf.py {want}")


def compile_and_pin(source_dir: Path, pin_dir: Path) -> None:
    """Compile bpf/ with bcc, load every program through the verifier, pin programs and
    maps under `pin_dir`. Runs in the child that `BpfDatapath.load` starts: the process
    ends right after, and LLVM's memory with it."""
    bcc = _bcc()
    try:
        # bcc wants bytes for text and names (str only earns a DeprecationWarning).
        module = bcc.BPF(
            text=source_text(source_dir).encode(), cflags=[f"-I{source_dir / 'include'}"]
        )
    except Exception as exc:
        raise BpfError(f"compiling bpf/: {exc}") from exc
    _check_layouts(module)
    pin_dir.mkdir(parents=True, exist_ok=True)
    prog_fds: dict[str, int] = {}
    for program in PROGRAMS:
        kwargs = {}
        if program.prog_type in ("CGROUP_SOCK_ADDR", "CGROUP_SOCKOPT"):
            kwargs["attach_type"] = getattr(bcc.BPFAttachType, program.attach_type or "")
        with _stderr_captured() as verifier_log:
            try:
                fn = module.load_func(
                    program.name.encode(), getattr(bcc.BPFProgType, program.prog_type), **kwargs
                )
            except Exception as exc:
                raise BpfError(
                    f"the verifier rejected {program.name}: {exc}\n"
                    f"verifier log (tail):\n{_tail(verifier_log())}"
                ) from exc
        _pin(fn.fd, pin_dir / program.name)
        prog_fds[program.name] = fn.fd
    map_fds = {
        name: module[name.encode()].map_fd if name != "steer_sockhash" else _sockhash_fd(module)
        for name in MAPS
    }
    for name, fd in map_fds.items():
        _pin(fd, pin_dir / name)
    # sk_msg runs on the sockhash: attaching it to the map is a one-time step.
    _attach_program(prog_fds["steer_skmsg"], map_fds["steer_sockhash"], "SK_MSG_VERDICT", 0)
    module.cleanup()


def _sockhash_fd(module: Any) -> int:
    # bcc 0.26 has no Table class for SOCKHASH; ask libbcc for the map's fd by name.
    bcc = _bcc()
    fd: int = bcc.lib.bpf_table_fd(module.module, b"steer_sockhash")
    if fd < 0:
        raise BpfError("steer_sockhash has no fd")
    return fd


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """libbcc prints the verifier log to fd 2; keep it to put in the error."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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
