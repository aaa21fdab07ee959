"""The local node's kernel wiring: namespaces, veth pairs, addresses, routes, sysctls,
and tearing down what steer created (processes first, then namespaces and cgroups).

Every call acts on namespaces the lab names itself; nothing is added to the host's root
network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from steer.constants import LAB_GATEWAY_IP, NODE_NETNS, POD_IFNAME, POD_NETNS_PREFIX
from steer.lab.spec import VETH_RE, LabError
from steer.node.cgroups import own_cgroup
from steer.node.netns import NETNS_RUN_DIR, netns_path, run_in_netns

# How long teardown waits for killed processes to leave a cgroup before rmdir gives up.
TEARDOWN_TIMEOUT_S = 3.0
_RT_SCOPE_LINK = 253
_RT_TABLE_MAIN = 254
_ALL_IPV4 = "0.0.0.0/0"


# --- cgroups ---------------------------------------------------------------------------------


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


def is_netns_mount(path: Path) -> bool:
    # A live name is an nsfs bind mount; a plain file left by an interrupted create
    # (or a mount lost with its mount namespace) has the device of the run directory.
    try:
        return path.stat().st_dev == Path("/proc/self/ns/net").stat().st_dev
    except FileNotFoundError:
        return False


def steer_netns_names() -> list[str]:
    try:
        names = [entry.name for entry in NETNS_RUN_DIR.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n == NODE_NETNS or n.startswith(POD_NETNS_PREFIX))


def ensure_netns(name: str) -> None:
    path = netns_path(name)
    if is_netns_mount(path):
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


class Netlink:
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

    def __enter__(self) -> Netlink:
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


def loopback_up(ipr: Any) -> None:
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


def write_sysctls(netns: str, values: Mapping[str, str]) -> None:
    """Write /proc/sys entries (keyed by path, since interface names may hold dots).

    /proc/sys/net resolves against the writing thread's namespace, so the writes
    happen in a thread inside ``netns``; one thread for the whole batch.
    """

    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", key).write_text(value)

    run_in_netns(netns, write)


def node_sysctls() -> dict[str, str]:
    # rp_filter is effectively max(all, <dev>), and new veths copy "default", which a
    # new namespace may inherit as strict from the host: pod-to-pod traffic arrives on
    # one veth with a source routed out of another, so strict mode would drop it.
    return {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
    }


def veth_sysctls(veth: str) -> dict[str, str]:
    return {
        f"net/ipv4/conf/{veth}/rp_filter": "0",
        # Answer ARP for any address the node routes elsewhere, so a pod that ARPs for
        # a peer directly (not for its gateway) still reaches the node, as with Calico...
        f"net/ipv4/conf/{veth}/proxy_arp": "1",
        # ...and answer at once: proxied replies are otherwise delayed up to 0.8 s.
        f"net/ipv4/neigh/{veth}/proxy_delay": "0",
    }


def current_pod_ip(pod_ipr: Any) -> str | None:
    index = _link_index(pod_ipr, POD_IFNAME)
    if index is None:
        return None
    for address, prefixlen in _ipv4_addrs(pod_ipr, index):
        if prefixlen == 32:
            return address
    return None


def wire_pod(node: Any, pod_ipr: Any, netns: str, veth: str, ip: str) -> int:
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


def prune_node_routes(node: Any, expected: Mapping[int, str]) -> None:
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
        if isinstance(ifname, str) and VETH_RE.match(ifname) and ifname not in keep:
            stale.append(int(link["index"]))
    return stale


def teardown(
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
    own = own_cgroup()
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


def raise_if(errors: list[str]) -> None:
    if errors:
        raise LabError("; ".join(errors))
