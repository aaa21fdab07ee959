"""The local node lab: a Kubernetes-like node built from namespaces on one machine.

The node is a network namespace of its own; each pod is a network namespace plus a
cgroup v2 directory, joined to the node by a veth pair wired the way Calico wires
pods: a /32 on the pod's ``eth0``, a default route through a link-scoped gateway
address, and that same gateway address on every node-side veth. Nothing is ever
added to the host's root network namespace, and in the host's root cgroup only the
``steer`` subtree is created.

The kernel, not the state file, is the source of truth: ``lab_up`` converges
whatever exists towards the requested pods (a pod keeps the address it already
has), and ``lab_down`` finds what to remove by name, so both keep working after a
crash that lost or corrupted the state file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypedDict

import yaml
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from steer.constants import (
    CGROUP2_CANDIDATES,
    CGROUP_SUBTREE,
    LAB_GATEWAY_IP,
    LAB_NODE_NAME,
    LAB_POD_CIDR,
    LAB_STATE_FILE,
    NODE_NETNS,
    POD_IFNAME,
    POD_NETNS_PREFIX,
    POD_VETH_PREFIX,
)
from steer.node.netns import NETNS_RUN_DIR, netns_path, run_in_netns

# Netns names show up in `ip netns list` and cgroup names in `systemd-cgls`, so they
# stay readable; past this length the tail is replaced by a hash to stay unique.
NETNS_NAME_MAX = 64
NODE_CGROUP_NAME = "node"
# How long teardown waits for killed processes to leave a cgroup before rmdir gives up.
TEARDOWN_TIMEOUT_S = 3.0

_HASH_LEN = 8
_VETH_RE = re.compile(rf"^{re.escape(POD_VETH_PREFIX)}[0-9a-f]{{{_HASH_LEN}}}$")
# RFC 1123 subdomain, which is what Kubernetes accepts for pod and namespace names;
# it also guarantees a name can never smuggle a "/" into a netns or cgroup path.
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_K8S_NAME_MAX = 253
_RT_SCOPE_LINK = 253
_RT_TABLE_MAIN = 254
_ALL_IPV4 = "0.0.0.0/0"


class LabError(RuntimeError):
    """The lab could not be brought to the requested state."""


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    # A copy, so the caller's dict can change without changing a "frozen" value.
    return MappingProxyType(dict(mapping))


def _metadata() -> Any:
    # Compared but not hashed: a mapping has no hash, and leaving it out keeps the
    # frozen dataclasses usable as set members and dict keys.
    return field(default_factory=dict, hash=False)


def _name_hash(namespace: str, name: str) -> str:
    return hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:_HASH_LEN]


def _pod_key(namespace: str, name: str) -> str:
    """The per-pod suffix shared by the netns name and the cgroup directory."""
    key = f"{namespace}-{name}"
    room = NETNS_NAME_MAX - len(POD_NETNS_PREFIX)
    if len(key) <= room:
        return key
    return f"{key[: room - _HASH_LEN - 1]}-{_name_hash(namespace, name)}"


def pod_netns_name(namespace: str, name: str) -> str:
    return POD_NETNS_PREFIX + _pod_key(namespace, name)


def pod_veth_name(namespace: str, name: str) -> str:
    # A hash, not the name: interface names are capped at 15 characters (IFNAMSIZ).
    return POD_VETH_PREFIX + _name_hash(namespace, name)


@dataclass(frozen=True)
class LabPodSpec:
    name: str
    namespace: str = "default"
    labels: Mapping[str, str] = _metadata()
    annotations: Mapping[str, str] = _metadata()
    # The labels of the pod's namespace; the lab has no Namespace objects of its own.
    namespace_labels: Mapping[str, str] = _metadata()

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("namespace", self.namespace)):
            if len(value) > _K8S_NAME_MAX or not _K8S_NAME_RE.match(value):
                raise ValueError(f"pod {what} {value!r} is not a valid Kubernetes name")
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))
        object.__setattr__(self, "namespace_labels", _frozen(self.namespace_labels))


class LabNodeJSON(TypedDict):
    netns: str
    name: str
    gateway: str
    pod_cidr: str
    cgroup: str


class LabPodJSON(TypedDict):
    name: str
    namespace: str
    netns: str
    ip: str
    cgroup: str
    veth: str
    labels: dict[str, str]
    annotations: dict[str, str]
    namespace_labels: dict[str, str]


class LabStateJSON(TypedDict):
    node: LabNodeJSON
    pods: list[LabPodJSON]


def _str_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} must map strings to strings")
    return dict(value)


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LabPod:
    name: str
    namespace: str
    ip: str
    netns: str
    cgroup: str
    veth: str
    labels: Mapping[str, str] = _metadata()
    annotations: Mapping[str, str] = _metadata()
    namespace_labels: Mapping[str, str] = _metadata()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))
        object.__setattr__(self, "namespace_labels", _frozen(self.namespace_labels))

    def to_json(self) -> LabPodJSON:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "netns": self.netns,
            "ip": self.ip,
            "cgroup": self.cgroup,
            "veth": self.veth,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "namespace_labels": dict(self.namespace_labels),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabPod:
        return cls(
            name=_str(data, "name"),
            namespace=_str(data, "namespace"),
            ip=_str(data, "ip"),
            netns=_str(data, "netns"),
            cgroup=_str(data, "cgroup"),
            veth=_str(data, "veth"),
            labels=_str_map(data.get("labels", {}), "labels"),
            annotations=_str_map(data.get("annotations", {}), "annotations"),
            namespace_labels=_str_map(data.get("namespace_labels", {}), "namespace_labels"),
        )


@dataclass(frozen=True)
class LabState:
    node_netns: str
    node_name: str
    gateway_ip: str
    pod_cidr: str
    pods: tuple[LabPod, ...]
    # Where node processes (Envoy, the agent) belong; empty if not recorded.
    node_cgroup: str = ""

    def pod(self, namespace: str, name: str) -> LabPod:
        for pod in self.pods:
            if (pod.namespace, pod.name) == (namespace, name):
                return pod
        raise KeyError(f"{namespace}/{name}")

    def to_json(self) -> LabStateJSON:
        return {
            "node": {
                "netns": self.node_netns,
                "name": self.node_name,
                "gateway": self.gateway_ip,
                "pod_cidr": self.pod_cidr,
                "cgroup": self.node_cgroup,
            },
            "pods": [pod.to_json() for pod in self.pods],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabState:
        """Parse what ``to_json`` wrote; raises ValueError (or KeyError) on anything else."""
        node = data["node"]
        pods = data["pods"]
        if not isinstance(node, Mapping) or not isinstance(pods, list):
            raise ValueError("lab state needs a 'node' object and a 'pods' list")
        return cls(
            node_netns=_str(node, "netns"),
            node_name=_str(node, "name"),
            gateway_ip=_str(node, "gateway"),
            pod_cidr=_str(node, "pod_cidr"),
            node_cgroup=str(node.get("cgroup", "")),
            pods=tuple(LabPod.from_json(pod) for pod in pods),
        )


def default_lab_specs() -> list[LabPodSpec]:
    return [LabPodSpec(name=app, labels={"app": app}) for app in ("client", "web", "api")]


# --- cgroups ---------------------------------------------------------------------------------


def cgroup2_root() -> Path:
    """The first of CGROUP2_CANDIDATES that is really a cgroup2 mount.

    Checking /proc/mounts matters on hybrid hosts, where /sys/fs/cgroup exists but is
    a tmpfs of v1 hierarchies and creating a directory in it would mean nothing.
    """
    mounts = Path("/proc/mounts").read_text().splitlines()
    cgroup2 = {fields[1] for fields in (line.split() for line in mounts) if fields[2] == "cgroup2"}
    for candidate in CGROUP2_CANDIDATES:
        if str(candidate) in cgroup2:
            return candidate
    raise LabError(f"no cgroup2 mount at any of {[str(c) for c in CGROUP2_CANDIDATES]}")


def _own_cgroup() -> Path | None:
    """This process's cgroup2 directory, if there is a cgroup2 hierarchy."""
    try:
        root = cgroup2_root()
    except LabError:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return None


def _cgroup_pids(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _kill_cgroup(cgroup: Path, own: Path | None) -> None:
    """SIGKILL every process in ``cgroup`` and below, except this process."""
    if not cgroup.is_dir():
        return
    kill_file = cgroup / "cgroup.kill"
    # cgroup.kill is atomic against forks, but would take this process down too if it
    # lives in the subtree (an agent started inside the node cgroup tearing down).
    shields_self = own is not None and own.is_relative_to(cgroup)
    if kill_file.exists() and not shields_self:
        kill_file.write_text("1")
        return
    for sub, _dirs, _files in os.walk(cgroup):
        _kill_pids(_cgroup_pids(Path(sub)))


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _rmdir_tree(top: Path, errors: list[str]) -> None:
    """Remove a cgroup directory and its children, bottom-up.

    rmdir fails with EBUSY while killed processes are still exiting, hence the retry.
    """
    if not top.is_dir():
        return
    dirs = [Path(sub) for sub, _d, _f in os.walk(top, topdown=False)]
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
    for cgroup in dirs:
        while True:
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    errors.append(f"rmdir {cgroup}: {exc.strerror}")
                    break
                time.sleep(0.02)


# --- network namespaces ----------------------------------------------------------------------


def _is_netns_mount(path: Path) -> bool:
    # A live name is an nsfs bind mount; a plain file left by an interrupted create
    # (or a mount lost with its mount namespace) has the device of the run directory.
    try:
        return path.stat().st_dev == Path("/proc/self/ns/net").stat().st_dev
    except FileNotFoundError:
        return False


def _steer_netns_names() -> list[str]:
    try:
        names = [entry.name for entry in NETNS_RUN_DIR.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n == NODE_NETNS or n.startswith(POD_NETNS_PREFIX))


def _ensure_netns(name: str) -> None:
    path = netns_path(name)
    if _is_netns_mount(path):
        return
    _remove_netns(name)
    pr_netns.create(str(path))


def _remove_netns(name: str) -> None:
    # pyroute2 unmounts (ignoring "not mounted") and then unlinks.
    with contextlib.suppress(FileNotFoundError):
        pr_netns.remove(str(netns_path(name)))


def _kill_netns_processes(names: Iterable[str]) -> None:
    wanted = set(names)
    if not wanted:
        return
    # One /proc scan for all namespaces; it sees the same processes `ip netns pids` does.
    by_ns: dict[str, list[int]] = pr_netns.ns_pids(str(NETNS_RUN_DIR))
    for name, pids in by_ns.items():
        if name in wanted:
            _kill_pids(pids)


class _Netlink:
    """One rtnetlink handle per namespace, opened lazily and closed together.

    Opening a handle in another namespace costs a fork inside pyroute2, so every
    operation on a namespace goes through the same handle.
    """

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def __call__(self, netns: str) -> Any:
        if netns not in self._handles:
            # flags=0: a typo must fail, not create an empty namespace. groups=0: we
            # only make requests, so subscribing to every rtnetlink event is pure cost.
            self._handles[netns] = IPRoute(netns=str(netns_path(netns)), flags=0, groups=0)
        return self._handles[netns]

    def __enter__(self) -> _Netlink:
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _set_up(ipr: Any, index: int) -> None:
    ipr.link("set", index=index, state="up")


def _loopback_up(ipr: Any) -> None:
    # A new namespace's lo is down, and 127.0.0.1 (Envoy admin, local probes) with it.
    lo = _link_index(ipr, "lo")
    if lo is not None:
        _set_up(ipr, lo)


def _ipv4_addrs(ipr: Any, index: int) -> list[tuple[str, int]]:
    return [
        (str(msg.get("IFA_ADDRESS")), int(msg["prefixlen"]))
        for msg in ipr.addr("dump", index=index, family=2)
    ]


def _add_addr(ipr: Any, index: int, address: str) -> None:
    try:
        ipr.addr("add", index=index, address=address, prefixlen=32)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _set_only_addr(ipr: Any, index: int, address: str) -> None:
    for other, prefixlen in _ipv4_addrs(ipr, index):
        if (other, prefixlen) != (address, 32):
            ipr.addr("del", index=index, address=other, prefixlen=prefixlen)
    _add_addr(ipr, index, address)


def _write_sysctls(netns: str, values: Mapping[str, str]) -> None:
    """Write /proc/sys entries (keyed by path, since interface names may hold dots).

    /proc/sys/net resolves against the writing thread's namespace, so the writes
    happen in a thread inside ``netns``; one thread for the whole batch.
    """

    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", key).write_text(value)

    run_in_netns(netns, write)


def _node_sysctls() -> dict[str, str]:
    # rp_filter is effectively max(all, <dev>), and new veths copy "default", which a
    # new namespace may inherit as strict from the host: pod-to-pod traffic arrives on
    # one veth with a source routed out of another, so strict mode would drop it.
    return {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
    }


def _veth_sysctls(veth: str) -> dict[str, str]:
    return {
        f"net/ipv4/conf/{veth}/rp_filter": "0",
        # Answer ARP for any address the node routes elsewhere, so a pod that ARPs for
        # a peer directly (not for its gateway) still reaches the node, as with Calico...
        f"net/ipv4/conf/{veth}/proxy_arp": "1",
        # ...and answer at once: proxied replies are otherwise delayed up to 0.8 s.
        f"net/ipv4/neigh/{veth}/proxy_delay": "0",
    }


# --- state file ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise lab_up/lab_down across processes.

    The namespace names are machine-wide, so the lock is too, whatever state file a
    caller uses. It is held on the netns run directory itself (which iproute2 never
    locks), so it leaves no lock file behind.
    """
    NETNS_RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(NETNS_RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_state(state: LabState, state_file: Path) -> None:
    tmp = state_file.with_name(f".{state_file.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as out:
            json.dump(state.to_json(), out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(state_file)
    finally:
        tmp.unlink(missing_ok=True)


def lab_status(state_file: Path = LAB_STATE_FILE) -> LabState | None:
    """The lab as last recorded by ``lab_up``, or None if there is none."""
    try:
        data = json.loads(state_file.read_text())
        return LabState.from_json(data)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"unreadable lab state {state_file}: {exc}; run lab down") from exc


# --- up / down -------------------------------------------------------------------------------


def _check_unique(specs: Sequence[LabPodSpec]) -> None:
    seen: dict[str, LabPodSpec] = {}
    for spec in specs:
        for naming in (pod_netns_name, pod_veth_name):
            key = naming(spec.namespace, spec.name)
            other = seen.setdefault(key, spec)
            if other is not spec:
                raise ValueError(
                    f"pods {other.namespace}/{other.name} and {spec.namespace}/{spec.name}"
                    f" would share {key!r}"
                )


def _current_pod_ip(pod_ipr: Any) -> str | None:
    index = _link_index(pod_ipr, POD_IFNAME)
    if index is None:
        return None
    for address, prefixlen in _ipv4_addrs(pod_ipr, index):
        if prefixlen == 32:
            return address
    return None


def _plan_ips(current: Sequence[str | None]) -> list[str]:
    """Give each pod an address, keeping the one it already has (``current``, in spec
    order) where possible.

    A fresh lab therefore numbers pods in spec order; a pod that survives a change of
    specs keeps its address, because other state (conntrack, policies) refers to it.
    """
    network = ipaddress.ip_network(LAB_POD_CIDR)
    reserved = {network.network_address, network.broadcast_address}
    reserved.add(ipaddress.ip_address(LAB_GATEWAY_IP))

    def assignable(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address in network and address not in reserved

    taken: set[str] = set()
    kept: list[str | None] = []
    for ip in current:
        if ip is not None and ip not in taken and assignable(ip):
            kept.append(ip)
            taken.add(ip)
        else:
            kept.append(None)
    free = (str(h) for h in network.hosts() if h not in reserved and str(h) not in taken)
    try:
        return [ip if ip is not None else next(free) for ip in kept]
    except StopIteration:
        raise LabError(f"{LAB_POD_CIDR} has no room for {len(current)} pods") from None


def _wire_pod(node: Any, pod_ipr: Any, netns: str, veth: str, ip: str) -> int:
    """Create or repair one pod's veth pair, addresses and routes; return the node-side
    interface index."""
    veth_index = _link_index(node, veth)
    eth_index = _link_index(pod_ipr, POD_IFNAME)
    if veth_index is None or eth_index is None:
        # Half a pair is useless and its name would block re-creating the pair.
        if veth_index is not None:
            node.link("del", index=veth_index)
        if eth_index is not None:
            pod_ipr.link("del", index=eth_index)
        # Creating the peer directly in the pod's namespace avoids a temporary name in
        # the node and a rename (which would need the link down).
        node.link(
            "add",
            ifname=veth,
            kind="veth",
            peer={"ifname": POD_IFNAME, "net_ns_fd": str(netns_path(netns))},
        )
        veth_index = _link_index(node, veth)
        eth_index = _link_index(pod_ipr, POD_IFNAME)
        if veth_index is None or eth_index is None:
            raise LabError(f"veth pair {veth}/{netns}:{POD_IFNAME} vanished after creation")

    _set_up(node, veth_index)
    _set_up(pod_ipr, eth_index)
    _set_only_addr(pod_ipr, eth_index, ip)
    _add_addr(node, veth_index, LAB_GATEWAY_IP)
    # The gateway is not in any subnet the pod has (its address is a /32), so it must
    # first be made reachable on the link before it can serve as the default route.
    pod_ipr.route("replace", dst=f"{LAB_GATEWAY_IP}/32", oif=eth_index, scope=_RT_SCOPE_LINK)
    pod_ipr.route("replace", dst=_ALL_IPV4, gateway=LAB_GATEWAY_IP, oif=eth_index)
    node.route("replace", dst=f"{ip}/32", oif=veth_index, scope=_RT_SCOPE_LINK)
    return veth_index


def _prune_node_routes(node: Any, expected: Mapping[int, str]) -> None:
    """Drop host routes on pod veths that point at an address the pod no longer has
    (left behind when a pod had to be renumbered)."""
    for route in node.route("dump", family=2, table=_RT_TABLE_MAIN):
        oif, dst = route.get("oif"), route.get("dst")
        if oif in expected and route["dst_len"] == 32 and dst != expected[oif]:
            # The kernel matches a delete on scope too, and pyroute2 would send "global".
            node.route("del", dst=f"{dst}/32", oif=oif, scope=route["scope"])


def _stale_veths(node: Any, keep: set[str]) -> list[int]:
    stale = []
    for link in node.link("dump"):
        ifname = link.get("IFLA_IFNAME")
        if isinstance(ifname, str) and _VETH_RE.match(ifname) and ifname not in keep:
            stale.append(int(link["index"]))
    return stale


def _teardown(
    netns_names: Sequence[str],
    cgroups: Sequence[Path],
    node: Any | None,
    keep_veths: set[str],
    errors: list[str],
) -> None:
    """Remove namespaces, cgroups and (through ``node``) stale pod veths.

    Processes go first: a process (or an open socket) keeps a namespace alive after
    its name is gone, and rmdir of a populated cgroup fails.
    """
    own = _own_cgroup()
    for cgroup in cgroups:
        _kill_cgroup(cgroup, own)
    _kill_netns_processes(netns_names)
    if node is not None:
        # Deleting one end deletes the pair; doing it explicitly makes it immediate
        # instead of waiting for the namespace to be freed.
        for index in _stale_veths(node, keep_veths):
            try:
                node.link("del", index=index)
            except NetlinkError as exc:
                # ENODEV: the pair went with its pod namespace since the dump.
                if exc.code != errno.ENODEV:
                    errors.append(f"delete veth {index} in {NODE_NETNS}: {exc}")
    for name in netns_names:
        try:
            _remove_netns(name)
        except OSError as exc:
            errors.append(f"remove netns {name}: {exc}")
    for cgroup in cgroups:
        _rmdir_tree(cgroup, errors)


def _raise_if(errors: list[str]) -> None:
    if errors:
        raise LabError("; ".join(errors))


def lab_up(specs: Sequence[LabPodSpec], state_file: Path = LAB_STATE_FILE) -> LabState:
    """Create or converge the lab to exactly ``specs`` and record it in ``state_file``.

    Idempotent: existing pods are checked and repaired in place and keep their
    addresses, new pods are added, and steer pods not in ``specs`` are removed.
    """
    specs = list(specs)
    _check_unique(specs)
    cgroup_base = cgroup2_root() / CGROUP_SUBTREE
    node_cgroup = cgroup_base / NODE_CGROUP_NAME
    state_file.parent.mkdir(parents=True, exist_ok=True)

    with _locked(), _Netlink() as netlink:
        _ensure_netns(NODE_NETNS)
        node = netlink(NODE_NETNS)
        _loopback_up(node)
        # Before any veth exists, so that new veths copy the relaxed defaults.
        _write_sysctls(NODE_NETNS, _node_sysctls())

        wanted_netns = [pod_netns_name(s.namespace, s.name) for s in specs]
        wanted_veths = [pod_veth_name(s.namespace, s.name) for s in specs]
        wanted_keys = {_pod_key(s.namespace, s.name) for s in specs} | {NODE_CGROUP_NAME}
        stale_netns = [n for n in _steer_netns_names() if n != NODE_NETNS and n not in wanted_netns]
        stale_cgroups = (
            [d for d in cgroup_base.iterdir() if d.is_dir() and d.name not in wanted_keys]
            if cgroup_base.is_dir()
            else []
        )
        errors: list[str] = []
        _teardown(stale_netns, stale_cgroups, node, set(wanted_veths), errors)
        _raise_if(errors)

        current: list[str | None] = []
        for netns in wanted_netns:
            _ensure_netns(netns)
            current.append(_current_pod_ip(netlink(netns)))
        ips = _plan_ips(current)

        node_cgroup.mkdir(parents=True, exist_ok=True)
        pods: list[LabPod] = []
        veth_ips: dict[int, str] = {}
        sysctls: dict[str, str] = {}
        for spec, netns, veth, ip in zip(specs, wanted_netns, wanted_veths, ips, strict=True):
            pod_ipr = netlink(netns)
            _loopback_up(pod_ipr)
            veth_ips[_wire_pod(node, pod_ipr, netns, veth, ip)] = ip
            sysctls.update(_veth_sysctls(veth))
            cgroup = cgroup_base / _pod_key(spec.namespace, spec.name)
            cgroup.mkdir(exist_ok=True)
            pods.append(
                LabPod(
                    name=spec.name,
                    namespace=spec.namespace,
                    ip=ip,
                    netns=netns,
                    cgroup=str(cgroup),
                    veth=veth,
                    labels=spec.labels,
                    annotations=spec.annotations,
                    namespace_labels=spec.namespace_labels,
                )
            )
        if sysctls:
            _write_sysctls(NODE_NETNS, sysctls)
        _prune_node_routes(node, veth_ips)

        state = LabState(
            node_netns=NODE_NETNS,
            node_name=LAB_NODE_NAME,
            gateway_ip=LAB_GATEWAY_IP,
            pod_cidr=LAB_POD_CIDR,
            pods=tuple(pods),
            node_cgroup=str(node_cgroup),
        )
        _write_state(state, state_file)
    return state


def lab_down(state_file: Path = LAB_STATE_FILE) -> None:
    """Remove every namespace, veth, cgroup and process of the lab, and the state file.

    Works from names alone, so a missing or corrupt state file changes nothing.
    Raises LabError only if something steer owns could not be removed.
    """
    errors: list[str] = []
    with _locked():
        try:
            cgroup_base: Path | None = cgroup2_root() / CGROUP_SUBTREE
        except LabError:
            cgroup_base = None
        names = _steer_netns_names()
        cgroups = [cgroup_base] if cgroup_base is not None and cgroup_base.is_dir() else []
        with _Netlink() as netlink:
            node = netlink(NODE_NETNS) if _is_netns_mount(netns_path(NODE_NETNS)) else None
            _teardown(names, cgroups, node, set(), errors)
        state_file.unlink(missing_ok=True)
    _raise_if(errors)


def lab_specs_from_yaml(text: str, source: str) -> list[LabPodSpec]:
    """Pod specs from a lab file:

    namespaces:             # optional: labels of each namespace
      default: {steer.dev/allow-exclusions: "true"}
    pods:
      - {name: web, namespace: default, labels: {app: web}, annotations: {...}}
    """
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise LabError(f"{source}: malformed YAML: {exc}; fix the syntax") from None
    if not isinstance(document, dict) or set(document) - {"namespaces", "pods"}:
        raise LabError(f"{source}: expected a mapping with keys 'namespaces' and 'pods'")
    namespaces = document.get("namespaces") or {}
    pods = document.get("pods") or []
    if not isinstance(namespaces, dict) or not isinstance(pods, list):
        raise LabError(f"{source}: 'namespaces' must be a mapping and 'pods' a list")
    specs = []
    for index, pod in enumerate(pods):
        where = f"{source}: pods[{index}]"
        if not isinstance(pod, dict) or "name" not in pod:
            raise LabError(f"{where}: each pod needs at least a 'name'")
        unknown = set(pod) - {"name", "namespace", "labels", "annotations"}
        if unknown:
            raise LabError(f"{where}: unknown field(s) {sorted(unknown)}; fix: remove them")
        namespace = str(pod.get("namespace", "default"))
        try:
            specs.append(
                LabPodSpec(
                    name=str(pod["name"]),
                    namespace=namespace,
                    labels=_str_map(pod.get("labels", {}), "labels"),
                    annotations=_str_map(pod.get("annotations", {}), "annotations"),
                    namespace_labels=_str_map(namespaces.get(namespace, {}), "namespace labels"),
                )
            )
        except ValueError as exc:
            raise LabError(f"{where}: {exc}") from None
    return specs
