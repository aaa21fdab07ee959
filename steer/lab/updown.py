"""Bring the local node up and down, and read what is up.

The kernel, not the state file, is the source of truth: ``lab_up`` converges whatever
exists towards the requested pods (a pod keeps the address it already has), and
``lab_down`` finds what to remove by name, so both keep working after a crash that lost
or corrupted the state file.

The node is a network namespace of its own; each pod is a network namespace plus a
cgroup v2 directory, joined to the node by a veth pair wired the way Calico wires
pods: a /32 on the pod's ``eth0``, a default route through a link-scoped gateway
address, and that same gateway address on every node-side veth. Nothing is ever
added to the host's root network namespace, and in the host's root cgroup only the
``steer`` subtree is created.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from steer.atomicfile import write_json_atomic
from steer.constants import (
    CGROUP_SUBTREE,
    LAB_GATEWAY_IP,
    LAB_NODE_NAME,
    LAB_POD_CIDR,
    LAB_STATE_FILE,
    NODE_NETNS,
)
from steer.lab.kubeproxy import is_kube_proxy_chain, render_kube_proxy
from steer.lab.services import LabService, LabServiceError, plan_cluster_ips
from steer.lab.spec import (
    NODE_CGROUP_NAME,
    LabError,
    LabPod,
    LabPodSpec,
    LabState,
    check_unique,
    plan_ips,
    pod_key,
    pod_netns_name,
    pod_veth_name,
)
from steer.lab.wiring import (
    Netlink,
    current_pod_ip,
    ensure_netns,
    is_netns_mount,
    loopback_up,
    node_sysctls,
    prune_node_routes,
    raise_if,
    steer_netns_names,
    teardown,
    veth_sysctls,
    wire_pod,
    write_sysctls,
)
from steer.model.service import Frontend, PodPorts, frontends
from steer.node.cgroups import CgroupError, cgroup2_root
from steer.node.netns import NETNS_RUN_DIR, netns_path, run_in_netns


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


def lab_status(state_file: Path = LAB_STATE_FILE) -> LabState | None:
    """The lab as last recorded by ``lab_up``, or None if there is none."""
    try:
        return LabState.from_text(state_file.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise LabError(f"unreadable lab state {state_file}: {exc}; run lab down") from exc


def lab_up(
    specs: Sequence[LabPodSpec],
    state_file: Path = LAB_STATE_FILE,
    services: Sequence[LabService] | None = None,
) -> LabState:
    """Create or converge the lab to exactly ``specs`` and record it in ``state_file``.

    Idempotent: existing pods are checked and repaired in place and keep their
    addresses, new pods are added, and steer pods not in ``specs`` are removed.
    ``services``: the lab's Services (None: keep the ones it has); each keeps its ClusterIP
    across calls, as the apiserver keeps it for a Service's lifetime.
    """
    specs = list(specs)
    check_unique(specs)
    try:
        before = lab_status(state_file)
    except LabError:
        before = None
    current_ips = {s.key: s.cluster_ip for s in (before.services if before else ()) if s.cluster_ip}
    if services is None:
        services = before.services if before else ()
    try:
        planned_services = plan_cluster_ips(services, current_ips)
    except LabServiceError as exc:
        raise LabError(str(exc)) from None
    cgroup_base = cgroup2_root() / CGROUP_SUBTREE
    node_cgroup = cgroup_base / NODE_CGROUP_NAME
    state_file.parent.mkdir(parents=True, exist_ok=True)

    with _locked(), Netlink() as netlink:
        ensure_netns(NODE_NETNS)
        node = netlink(NODE_NETNS)
        loopback_up(node)
        # Before any veth exists, so that new veths copy the relaxed defaults.
        write_sysctls(NODE_NETNS, node_sysctls())

        wanted_netns = [pod_netns_name(s.namespace, s.name) for s in specs]
        wanted_veths = [pod_veth_name(s.namespace, s.name) for s in specs]
        wanted_keys = {pod_key(s.namespace, s.name) for s in specs} | {NODE_CGROUP_NAME}
        stale_netns = [n for n in steer_netns_names() if n != NODE_NETNS and n not in wanted_netns]
        stale_cgroups = (
            [d for d in cgroup_base.iterdir() if d.is_dir() and d.name not in wanted_keys]
            if cgroup_base.is_dir()
            else []
        )
        errors: list[str] = []
        teardown(stale_netns, stale_cgroups, node, set(wanted_veths), errors)
        raise_if(errors)

        current: list[str | None] = []
        for netns in wanted_netns:
            ensure_netns(netns)
            current.append(current_pod_ip(netlink(netns)))
        ips = plan_ips(current)

        node_cgroup.mkdir(parents=True, exist_ok=True)
        pods: list[LabPod] = []
        veth_ips: dict[int, str] = {}
        sysctls: dict[str, str] = {}
        for spec, netns, veth, ip in zip(specs, wanted_netns, wanted_veths, ips, strict=True):
            pod_ipr = netlink(netns)
            loopback_up(pod_ipr)
            veth_ips[wire_pod(node, pod_ipr, netns, veth, ip)] = ip
            sysctls.update(veth_sysctls(veth))
            cgroup = cgroup_base / pod_key(spec.namespace, spec.name)
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
                    ports=spec.ports,
                )
            )
        if sysctls:
            write_sysctls(NODE_NETNS, sysctls)
        prune_node_routes(node, veth_ips)

        state = LabState(
            node_netns=NODE_NETNS,
            node_name=LAB_NODE_NAME,
            gateway_ip=LAB_GATEWAY_IP,
            pod_cidr=LAB_POD_CIDR,
            pods=tuple(pods),
            node_cgroup=str(node_cgroup),
            services=tuple(planned_services),
        )
        # After the pods, before steer's agent sees the state: in a cluster kube-proxy's
        # rules are there before steer's too.
        apply_lab_kube_proxy(state)
        write_json_atomic(state_file, state.to_json(), sort_keys=True)
    return state


def lab_frontends(state: LabState) -> list[Frontend]:
    """The frontends of the lab's Services, as the agent computes them."""
    ports = [
        PodPorts(f"{p.namespace}/{p.name}", p.namespace, IPv4Address(p.ip), p.labels, p.ports)
        for p in state.pods
    ]
    found, _ = frontends(
        [s.model(ports) for s in state.services],
        [IPv4Network(state.pod_cidr)],
        [IPv4Address(state.gateway_ip)],
    )
    return found


def apply_lab_kube_proxy(state: LabState) -> None:
    """The lab's stand-in for kube-proxy (steer.lab.kubeproxy): its rules for the lab's
    Services, in the node's namespace, written over whatever an earlier `lab up` left."""

    def apply() -> None:
        saved = subprocess.run(
            ["iptables-legacy-save"], capture_output=True, text=True, check=True
        ).stdout
        installed: dict[str, set[str]] = {}
        table = ""
        for line in saved.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and is_kube_proxy_chain(table, line[1:].split()[0]):
                installed.setdefault(table, set()).add(line[1:].split()[0])
        text = render_kube_proxy(lab_frontends(state), installed=installed or None)
        done = subprocess.run(
            ["iptables-legacy-restore", "--noflush"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"the lab's kube-proxy rules were refused: {done.stderr.strip()}")

    run_in_netns(NODE_NETNS, apply)


def lab_down(state_file: Path = LAB_STATE_FILE) -> None:
    """Remove every namespace, veth, cgroup and process of the lab, and the state file.

    Works from names alone, so a missing or corrupt state file changes nothing.
    Raises LabError only if something steer owns could not be removed.
    """
    errors: list[str] = []
    with _locked():
        try:
            cgroup_base: Path | None = cgroup2_root() / CGROUP_SUBTREE
        except CgroupError:
            cgroup_base = None
        names = steer_netns_names()
        cgroups = [cgroup_base] if cgroup_base is not None and cgroup_base.is_dir() else []
        with Netlink() as netlink:
            node = netlink(NODE_NETNS) if is_netns_mount(netns_path(NODE_NETNS)) else None
            teardown(names, cgroups, node, set(), errors)
        state_file.unlink(missing_ok=True)
    raise_if(errors)
