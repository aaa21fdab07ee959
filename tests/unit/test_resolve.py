"""Finding a pod's cgroup and netns from its API object, on recorded node layouts.

Each layout is the cgroup tree a real node has for one kubelet cgroup driver and one
container runtime, written out as literal paths (never derived with the code under
test), rebuilt in tmp_path with a fake /proc whose ns/net links point at files standing
in for namespaces.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from steer.node.cgroups import (
    MAX_POD_CGROUP_LEVEL,
    WALK_MAX_DEPTH,
    NotFoundError,
    ResolveError,
    cgroup_level,
    container_cgroups,
    netns_inode,
    pod_cgroup,
    pod_netns,
    resolve_pod_cgroup,
    resolve_pod_netns,
)
from steer.node.datapath import NodeDatapath
from steer.node.fakekernel import RecordingKernel
from steer.node.features import Features
from steer.node.kubeagent import KubeAgent

REPO = Path(__file__).parents[2]

UID = "5c3b9e2a-8f1d-4c6e-9a7b-2d4f6e8a0b1c"
UID_ = "5c3b9e2a_8f1d_4c6e_9a7b_2d4f6e8a0b1c"  # as systemd slice names spell it
NEIGHBOUR_UID = "0e7d1f4b-2a6c-4b8e-8d3f-9c1a5e7b2d40"
ABSENT_UID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


def _container_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


SANDBOX_ID = _container_id("sandbox")  # pause: no status entry in the API
MIGRATE_ID = _container_id("migrate")  # finished init container: its cgroup is gone
PROXY_ID = _container_id("proxy")  # native sidecar (init, restartPolicy Always)
APP_ID = _container_id("app")
SANDBOX_PID, APP_PID, PROXY_PID, CONMON_PID = 4101, 4102, 4103, 4200
HOST_NETNS = "net:[4026531840]"  # the node's: the agent's own (hostNetwork) and PID 1's
POD_NETNS = "net:[4026532310]"


@dataclass(frozen=True)
class Layout:
    qos: str
    runtime: str  # the containerID scheme
    pod_dir: str  # the pod's cgroup, relative to the cgroup2 mount
    container: str  # a container's cgroup name inside the pod's, {id} for its ID
    conmon: str | None = None  # CRI-O's conmon cgroup per container (host netns)
    v2_mount: str = ""  # the cgroup2 mount, relative to the root steer is given
    subgroup: str = ""  # crun's sub-cgroup holding a container's processes


SYSTEMD_BURSTABLE = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
LAYOUTS = [
    pytest.param(
        Layout("Burstable", "containerd", SYSTEMD_BURSTABLE, "cri-containerd-{id}.scope"),
        id="systemd-containerd-burstable",
    ),
    pytest.param(
        Layout(
            "BestEffort",
            "containerd",
            f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",
            "cri-containerd-{id}.scope",
        ),
        id="systemd-containerd-besteffort",
    ),
    pytest.param(
        Layout(
            "Guaranteed",
            "containerd",
            f"kubepods.slice/kubepods-pod{UID_}.slice",
            "cri-containerd-{id}.scope",
        ),
        id="systemd-containerd-guaranteed",
    ),
    pytest.param(
        Layout("Burstable", "containerd", f"kubepods/burstable/pod{UID}", "{id}"),
        id="cgroupfs-containerd-burstable",
    ),
    pytest.param(
        Layout("Guaranteed", "containerd", f"kubepods/pod{UID}", "{id}"),
        id="cgroupfs-containerd-guaranteed",
    ),
    pytest.param(
        Layout(
            "Burstable",
            "cri-o",
            SYSTEMD_BURSTABLE,
            "crio-{id}.scope",
            conmon="crio-conmon-{id}.scope",
            subgroup="container",
        ),
        id="systemd-crio-crun-burstable",
    ),
    pytest.param(
        Layout(
            "BestEffort",
            "cri-o",
            f"kubepods/besteffort/pod{UID}",
            "crio-{id}",
            conmon="crio-conmon-{id}",
        ),
        id="cgroupfs-crio-besteffort",
    ),
    pytest.param(
        Layout("Burstable", "docker", SYSTEMD_BURSTABLE, "docker-{id}.scope"),
        id="systemd-cri-dockerd-burstable",
    ),
    pytest.param(
        Layout(
            "Burstable",
            "containerd",
            SYSTEMD_BURSTABLE,
            "cri-containerd-{id}.scope",
            v2_mount="unified",
        ),
        id="hybrid-host-unified",
    ),
    pytest.param(
        Layout(
            "Burstable",
            "containerd",
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
            f"kubelet-kubepods-burstable-pod{UID_}.slice",
            "cri-containerd-{id}.scope",
        ),
        id="nested-kind-cgroup-root",
    ),
    pytest.param(
        Layout(
            "Guaranteed",
            "containerd",
            f"system.slice/docker-{_container_id('node')}.scope/kubelet/kubepods/pod{UID}",
            "{id}",
        ),
        id="nested-node-in-container-cgroupfs",
    ),
    # scripts/kube-node.sh's node, as recorded there: kubelet 1.20 with the cgroupfs driver
    # and --cgroup-root=/steer-kube on a hybrid host; runc 1.1 puts the pod in the unified
    # hierarchy under the same path, pause and app containers side by side.
    pytest.param(
        Layout(
            "BestEffort",
            "containerd",
            f"steer-kube/kubepods/besteffort/pod{UID}",
            "{id}",
            v2_mount="unified",
        ),
        id="hybrid-cgroupfs-cgroup-root",
    ),
]


def api_pod(
    layout: Layout | None = None,
    *,
    uid: str = UID,
    runtime: str = "containerd",
    qos: str | None = "Burstable",
    spec: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod as `kubectl get pod -o json` shows it on a running node."""
    if layout is not None:
        runtime, qos = layout.runtime, layout.qos
    started = "2024-05-02T09:14:07Z"

    def status(name: str, image: str, cid: str, *, running: bool = True) -> dict[str, Any]:
        state = (
            {"running": {"startedAt": started}}
            if running
            else {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": started}}
        )
        return {
            "name": name,
            "image": f"registry.example.com/shop/{image}:1.4.2",
            "imageID": f"registry.example.com/shop/{image}@sha256:{_container_id(image)}",
            "containerID": f"{runtime}://{cid}",
            "ready": True,
            "started": running,
            "restartCount": 0,
            "state": state,
            "lastState": {},
        }

    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "checkout-7d4b9c6f5-x2lqp",
            "generateName": "checkout-7d4b9c6f5-",
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": "918273",
            "creationTimestamp": "2024-05-02T09:13:58Z",
            "labels": {"app": "checkout", "pod-template-hash": "7d4b9c6f5"},
            "annotations": {"steer.dev/dataplane": "ebpf", **(annotations or {})},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "checkout-7d4b9c6f5",
                    "uid": "b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": "worker-2",
            "restartPolicy": "Always",
            "initContainers": [
                {"name": "migrate", "image": "registry.example.com/shop/migrate:1.4.2"},
                {
                    "name": "proxy",
                    "image": "registry.example.com/shop/proxy:1.4.2",
                    "restartPolicy": "Always",
                },
            ],
            "containers": [{"name": "app", "image": "registry.example.com/shop/app:1.4.2"}],
            **(spec or {}),
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "hostIP": "192.168.10.12",
            "podIP": "10.244.2.17",
            "podIPs": [{"ip": "10.244.2.17"}],
            "startTime": "2024-05-02T09:13:58Z",
            "initContainerStatuses": [
                status("migrate", "migrate", MIGRATE_ID, running=False),
                status("proxy", "proxy", PROXY_ID),
            ],
            "containerStatuses": [status("app", "app", APP_ID)],
        },
    }
    if qos is not None:
        pod["status"]["qosClass"] = qos
    return pod


@dataclass(frozen=True)
class Node:
    root: Path  # the cgroup root handed to steer
    proc: Path
    pod_dir: Path
    pod_netns: Path  # the file the pod's ns/net links point at
    layout: Layout

    def container(self, container_id: str) -> Path:
        return self.pod_dir / self.layout.container.format(id=container_id)

    def procs(self, container_id: str) -> Path:
        return self.container(container_id) / self.layout.subgroup / "cgroup.procs"


def make_cgroup(mount: Path, relative: str, pids: tuple[int, ...] = ()) -> Path:
    """mkdir -p inside a cgroup2 mount: each level gets the files the kernel creates."""
    path = mount
    for part in ("", *Path(relative).parts):
        path /= part
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        if not (path / "cgroup.procs").exists():
            (path / "cgroup.procs").write_text("")
    (path / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))
    return path


def make_process(proc: Path, pid: int | str, netns: Path) -> None:
    (proc / str(pid) / "ns").mkdir(parents=True)
    (proc / str(pid) / "ns" / "net").symlink_to(netns)


def build_node(tmp_path: Path, layout: Layout, pod_dir: str | None = None, uid: str = UID) -> Node:
    """The layout's cgroup tree with our pod and a neighbour, plus a matching /proc."""
    root = tmp_path / "cgroup"
    mount = root / layout.v2_mount
    nsfs = tmp_path / "nsfs"
    nsfs.mkdir()
    proc = tmp_path / "proc"
    (nsfs / HOST_NETNS).touch()
    make_process(proc, 1, nsfs / HOST_NETNS)
    # The agent itself (hostNetwork): the resolver's reference for the node's netns.
    make_process(proc, "self", nsfs / HOST_NETNS)

    relative = pod_dir if pod_dir is not None else layout.pod_dir
    # The neighbour pod has the same layout under another UID, spelled the same way.
    other = NEIGHBOUR_UID if "-" in uid else NEIGHBOUR_UID.replace("-", "")
    neighbour = relative.replace(uid, other).replace(uid.replace("-", "_"), other.replace("-", "_"))
    for pod, netns, pid_offset in ((relative, POD_NETNS, 0), (neighbour, "net:[4026532999]", 1000)):
        (nsfs / netns).touch()
        make_cgroup(mount, pod)
        for container_id, container_pid in (
            (SANDBOX_ID, SANDBOX_PID),
            (PROXY_ID, PROXY_PID),
            (APP_ID, APP_PID),
        ):
            pid = container_pid + pid_offset
            container = f"{pod}/{layout.container.format(id=container_id)}"
            make_cgroup(mount, container)
            make_cgroup(mount, f"{container}/{layout.subgroup}", (pid,))
            make_process(proc, pid, nsfs / netns)
            if layout.conmon:
                conmon_pid = CONMON_PID + pid - SANDBOX_PID
                make_cgroup(mount, f"{pod}/{layout.conmon.format(id=container_id)}", (conmon_pid,))
                make_process(proc, conmon_pid, nsfs / HOST_NETNS)
    if layout.v2_mount:
        # A hybrid host also has the pod in every v1 hierarchy: plain directories there.
        (root / "cpu,cpuacct" / relative).mkdir(parents=True)
        (root / "cpu,cpuacct" / relative / "cgroup.procs").write_text("")
    return Node(root, proc, mount / relative, nsfs / POD_NETNS, layout)


@pytest.fixture(params=LAYOUTS)
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Node:
    return build_node(tmp_path, request.param)


SYSTEMD_CONTAINERD = Layout(
    "Burstable", "containerd", SYSTEMD_BURSTABLE, "cri-containerd-{id}.scope"
)


# --- the pod's cgroup -----------------------------------------------------------------------


def test_pod_cgroup(node: Node) -> None:
    assert pod_cgroup(api_pod(node.layout), node.root) == node.pod_dir


def test_container_cgroups_are_the_pods_running_containers(node: Node) -> None:
    # Not the sandbox or conmon (no status entry), nor the finished init container.
    expected = [node.container(PROXY_ID), node.container(APP_ID)]
    assert container_cgroups(api_pod(node.layout), node.root) == expected


def test_pod_not_on_this_node(node: Node) -> None:
    pod = api_pod(node.layout, uid=ABSENT_UID)
    assert pod_cgroup(pod, node.root) is None
    assert container_cgroups(pod, node.root) == []
    assert pod_netns(pod, node.root, node.proc) is None
    with pytest.raises(NotFoundError) as raised:
        resolve_pod_cgroup(pod, node.root)
    message = str(raised.value)
    assert message.startswith("pod shop/checkout-7d4b9c6f5-x2lqp: no cgroup v2 directory")
    assert f"{node.root}/kubepods.slice/kubepods-" in message
    assert f"a search of {node.root} to depth {WALK_MAX_DEPTH}" in message


def test_hybrid_host_given_the_v2_mount_itself(tmp_path: Path) -> None:
    layout = Layout(
        "Burstable",
        "containerd",
        SYSTEMD_BURSTABLE,
        "cri-containerd-{id}.scope",
        v2_mount="unified",
    )
    node = build_node(tmp_path, layout)
    assert pod_cgroup(api_pod(layout), node.root / "unified") == node.pod_dir


def test_hybrid_host_v1_hierarchies_never_match(tmp_path: Path) -> None:
    layout = Layout(
        "Burstable",
        "containerd",
        SYSTEMD_BURSTABLE,
        "cri-containerd-{id}.scope",
        v2_mount="unified",
    )
    node = build_node(tmp_path, layout)
    # The pod only in a v1 hierarchy (a runtime that never joins the unified one): no use
    # for cgroup BPF, so not an answer, and v1 trees are not searched either.
    shutil.rmtree(node.pod_dir)
    assert (node.root / "cpu,cpuacct" / SYSTEMD_BURSTABLE).is_dir()
    assert pod_cgroup(api_pod(layout), node.root) is None


def test_systemd_slice_names_need_the_uid_with_underscores(tmp_path: Path) -> None:
    # A slice named with the UID's dashes would be a deeper slice to systemd: never the pod.
    dashed = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice"
    node = build_node(tmp_path, SYSTEMD_CONTAINERD, pod_dir=dashed)
    assert pod_cgroup(api_pod(SYSTEMD_CONTAINERD), node.root) is None


@pytest.mark.parametrize(
    ("extra_levels", "found"),
    [(WALK_MAX_DEPTH - 3, True), (WALK_MAX_DEPTH - 2, False)],
    ids=["at-the-bound", "below-the-bound"],
)
def test_search_is_bounded(tmp_path: Path, extra_levels: int, found: bool) -> None:
    layout = Layout("Burstable", "containerd", "", "{id}")
    prefix = "/".join(f"level{i}" for i in range(extra_levels))
    node = build_node(tmp_path, layout, pod_dir=f"{prefix}/kubepods/burstable/pod{UID}")
    assert pod_cgroup(api_pod(layout), node.root) == (node.pod_dir if found else None)


def test_mirror_pod_is_found_by_its_static_uid(tmp_path: Path) -> None:
    # The API server gives a static pod's mirror a UID of its own; the cgroup has the
    # kubelet's (the config hash, 32 hex digits).
    static_uid = "d41d8cd98f00b204e9800998ecf8427e"
    layout = Layout(
        "Guaranteed",
        "containerd",
        f"kubepods.slice/kubepods-pod{static_uid}.slice",
        "cri-containerd-{id}.scope",
    )
    node = build_node(tmp_path, layout, uid=static_uid)
    pod = api_pod(layout, annotations={"kubernetes.io/config.mirror": static_uid})
    assert pod_cgroup(pod, node.root) == node.pod_dir


def test_unknown_qos_class_tries_every_class(tmp_path: Path) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    assert pod_cgroup(api_pod(qos=None), node.root) == node.pod_dir


def test_waiting_containers_have_no_cgroup_yet(tmp_path: Path) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    pod = api_pod(SYSTEMD_CONTAINERD)
    for status in pod["status"]["initContainerStatuses"] + pod["status"]["containerStatuses"]:
        del status["containerID"]
        status["state"] = {"waiting": {"reason": "PodInitializing"}}
    assert pod_cgroup(pod, node.root) == node.pod_dir
    assert container_cgroups(pod, node.root) == []


def _set(pod: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    target: Any = pod
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    target[last] = value
    return pod


@pytest.mark.parametrize(
    ("field", "value", "call", "says"),
    [
        ("metadata.uid", None, pod_cgroup, "metadata.uid None is missing"),
        ("metadata.uid", "../../system.slice", pod_cgroup, "not a UID"),
        ("status.containerStatuses.0.containerID", APP_ID, container_cgroups, "not <runtime>://"),
        (
            "status.containerStatuses.0.containerID",
            "containerd://../../x",
            container_cgroups,
            "not <runtime>://",
        ),
        (
            "status.containerStatuses.0.containerID",
            f"rkt://{APP_ID}",
            container_cgroups,
            "runtime 'rkt' has no known cgroup layout",
        ),
    ],
    ids=["no-uid", "uid-escapes", "id-without-runtime", "id-escapes", "unknown-runtime"],
)
def test_malformed_pods_raise(tmp_path: Path, field: str, value: Any, call: Any, says: str) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    pod = _set(api_pod(SYSTEMD_CONTAINERD), field, value)
    with pytest.raises(ResolveError) as raised:
        call(pod, node.root)
    assert not isinstance(raised.value, NotFoundError)
    assert str(raised.value).startswith("pod shop/checkout-7d4b9c6f5-x2lqp: ")
    assert says in str(raised.value)


# --- the pod's netns ------------------------------------------------------------------------


def test_pod_netns_is_the_sandbox_process(node: Node) -> None:
    path = pod_netns(api_pod(node.layout), node.root, node.proc)
    assert path == str(node.proc / str(SANDBOX_PID) / "ns" / "net")
    assert netns_inode(path) == node.pod_netns.stat().st_ino


def test_pod_netns_falls_back_to_a_container(tmp_path: Path) -> None:
    # CRI-O with drop_infra_ctr, or a sandbox whose pid is gone: any container will do.
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    node.procs(SANDBOX_ID).write_text("")
    path = pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    assert path is not None
    assert path in {str(node.proc / str(pid) / "ns" / "net") for pid in (APP_PID, PROXY_PID)}
    assert netns_inode(path) == node.pod_netns.stat().st_ino


def test_pod_netns_skips_processes_in_the_nodes_netns(tmp_path: Path) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    make_process(node.proc, 4999, node.proc.parent / "nsfs" / HOST_NETNS)
    node.procs(SANDBOX_ID).write_text(f"4999\n{SANDBOX_PID}\n")
    path = pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    assert path == str(node.proc / str(SANDBOX_PID) / "ns" / "net")


def test_pod_netns_never_uses_conmon(tmp_path: Path) -> None:
    layout = Layout(
        "Burstable", "cri-o", SYSTEMD_BURSTABLE, "crio-{id}.scope", conmon="crio-conmon-{id}.scope"
    )
    node = build_node(tmp_path, layout)
    for container_id in (SANDBOX_ID, PROXY_ID, APP_ID):
        node.procs(container_id).write_text("")
    # Even where the node's netns cannot be told apart (no /proc/self/ns/net), conmon is
    # not the pod.
    (node.proc / "self" / "ns" / "net").unlink()
    assert pod_netns(api_pod(layout), node.root, node.proc) is None


@pytest.mark.parametrize(
    "procs",
    ["", "0\n0\n", "777001\n"],
    ids=["no-process", "outside-our-pid-namespace", "exited"],
)
def test_pod_netns_without_a_live_process(tmp_path: Path, procs: str) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    for container_id in (SANDBOX_ID, PROXY_ID, APP_ID):
        node.procs(container_id).write_text(procs)
    pod = api_pod(SYSTEMD_CONTAINERD)
    assert pod_netns(pod, node.root, node.proc) is None
    with pytest.raises(NotFoundError) as raised:
        resolve_pod_netns(pod, node.root, node.proc)
    assert f"no live process in the pod's cgroup {node.pod_dir}" in str(raised.value)
    assert str(node.container(APP_ID)) in raised.value.tried


def test_host_network_pod_has_no_netns_of_its_own(tmp_path: Path) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    pod = api_pod(SYSTEMD_CONTAINERD, spec={"hostNetwork": True})
    assert pod_netns(pod, node.root, node.proc) is None
    with pytest.raises(NotFoundError, match=r"spec\.hostNetwork"):
        resolve_pod_netns(pod, node.root, node.proc)


def test_netns_inode_of_an_exited_process_is_none(tmp_path: Path) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    path = pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    assert path is not None
    (node.proc / str(SANDBOX_PID) / "ns" / "net").unlink()
    assert netns_inode(path) is None


# --- the node's own netns, and processes the agent may not inspect ------------------------


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[Path]]:
    """Paths whose stat() fails with EACCES, as /proc/<pid>/ns/net does for a process the
    agent may not ptrace-read (a capability it lacks). Root in the test process passes
    every permission check, so the kernel's refusal is stood in for here."""
    denied: set[Path] = set()
    real_stat = Path.stat

    def stat(self: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if self in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", stat)
    yield denied


def test_the_nodes_netns_is_the_agents_own_not_pid_1s(tmp_path: Path) -> None:
    # A node whose PID 1 is in another netns (the machine's init, with the node in a
    # container or a namespace of its own), and a process in the node's netns inside the
    # pod's sandbox cgroup: that one is the node's, never the pod's.
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    machine = tmp_path / "nsfs" / "net:[4026530001]"
    machine.touch()
    (node.proc / "1" / "ns" / "net").unlink()
    (node.proc / "1" / "ns" / "net").symlink_to(machine)
    make_process(node.proc, 4999, tmp_path / "nsfs" / HOST_NETNS)
    node.procs(SANDBOX_ID).write_text(f"4999\n{SANDBOX_PID}\n")
    path = pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    assert path == str(node.proc / str(SANDBOX_PID) / "ns" / "net")


def test_pid_1_unreadable_costs_nothing(tmp_path: Path, unreadable: set[Path]) -> None:
    # This machine's init holds a capability no other process has: even root gets EACCES
    # on /proc/1/ns/*.
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    unreadable.add(node.proc / "1" / "ns" / "net")
    path = pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    assert path == str(node.proc / str(SANDBOX_PID) / "ns" / "net")


def test_an_unreadable_process_is_skipped_for_another(
    tmp_path: Path, unreadable: set[Path]
) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    unreadable.add(node.proc / str(SANDBOX_PID) / "ns" / "net")
    path = pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    assert path in {str(node.proc / str(pid) / "ns" / "net") for pid in (APP_PID, PROXY_PID)}
    assert netns_inode(path) == node.pod_netns.stat().st_ino


def test_a_pod_whose_processes_are_all_unreadable_names_them(
    tmp_path: Path, unreadable: set[Path]
) -> None:
    node = build_node(tmp_path, SYSTEMD_CONTAINERD)
    denied = [node.proc / str(pid) / "ns" / "net" for pid in (SANDBOX_PID, APP_PID, PROXY_PID)]
    unreadable.update(denied)
    with pytest.raises(NotFoundError) as raised:
        resolve_pod_netns(api_pod(SYSTEMD_CONTAINERD), node.root, node.proc)
    for path in denied:
        assert f"{path} (permission denied)" in raised.value.tried


# --- what a real node leaves behind: stale directories, restarted containers --------------

HYBRID_CGROUP_ROOT = Layout(
    "BestEffort", "containerd", f"steer-kube/kubepods/besteffort/pod{UID}", "{id}", "", "unified"
)


def test_stale_pod_directories_are_ignored(tmp_path: Path) -> None:
    # kubelet removes a deleted pod's v1 directories but not the v2 one runc made: the
    # same pod name re-created (a new UID) sits beside its predecessor's empty directory,
    # which may even keep a container directory with no process.
    old_uid = "3f2e1d0c-9b8a-4765-8432-10fedcba9876"
    node = build_node(tmp_path, HYBRID_CGROUP_ROOT)
    mount = node.root / "unified"
    stale = make_cgroup(mount, f"steer-kube/kubepods/besteffort/pod{old_uid}")
    make_cgroup(mount, f"steer-kube/kubepods/besteffort/pod{old_uid}/{_container_id('old')}")
    pod = api_pod(HYBRID_CGROUP_ROOT)
    assert pod_cgroup(pod, node.root) == node.pod_dir
    assert pod_netns(pod, node.root, node.proc) == str(node.proc / str(SANDBOX_PID) / "ns" / "net")
    # The deleted pod's object, still in a watch cache for a moment: its directory is
    # found, but it leads to no netns at all (rather than someone else's).
    gone = api_pod(HYBRID_CGROUP_ROOT, uid=old_uid)
    assert pod_cgroup(gone, node.root) == stale
    assert pod_netns(gone, node.root, node.proc) is None


def test_a_restarted_container_is_found_in_the_same_pod(tmp_path: Path) -> None:
    # Same pod (UID), new container: status carries the new containerID; the old
    # container's directory may linger, empty, beside the new one.
    node = build_node(tmp_path, HYBRID_CGROUP_ROOT)
    pod = api_pod(HYBRID_CGROUP_ROOT)
    before = pod_netns(pod, node.root, node.proc)
    restarted_id, restarted_pid = _container_id("app, restarted"), 4321
    node.procs(APP_ID).write_text("")
    make_cgroup(node.root / "unified", f"{node.layout.pod_dir}/{restarted_id}", (restarted_pid,))
    make_process(node.proc, restarted_pid, node.pod_netns)
    status = pod["status"]["containerStatuses"][0]
    status["restartCount"] = 1
    status["lastState"] = {"terminated": {"exitCode": 137, "containerID": status["containerID"]}}
    status["containerID"] = f"containerd://{restarted_id}"

    assert pod_cgroup(pod, node.root) == node.pod_dir
    assert container_cgroups(pod, node.root) == [
        node.container(PROXY_ID),
        node.pod_dir / restarted_id,
    ]
    assert pod_netns(pod, node.root, node.proc) == before
    # And with the sandbox's process gone too, the new container leads to the same netns.
    node.procs(SANDBOX_ID).write_text("")
    node.procs(PROXY_ID).write_text("")
    path = pod_netns(pod, node.root, node.proc)
    assert path == str(node.proc / str(restarted_pid) / "ns" / "net")
    assert netns_inode(path) == node.pod_netns.stat().st_ino


# --- how deep connect4 looks for a pod's cgroup --------------------------------------------


def test_cgroup_level_counts_from_the_hierarchys_top(node: Node) -> None:
    assert cgroup_level(node.root / node.layout.v2_mount) == 0
    assert cgroup_level(node.pod_dir) == len(Path(node.layout.pod_dir).parts)


def test_the_agents_bound_is_connect4s() -> None:
    # connect4 walks a process's ancestors only this deep; the agent keeps deeper pods on
    # iptables, so the two must agree.
    source = (REPO / "bpf" / "connect4.c").read_text()
    found = re.search(r"#define STEER_MAX_CGROUP_LEVEL (\d+)", source)
    assert found is not None
    assert int(found.group(1)) == MAX_POD_CGROUP_LEVEL


# --- the agent: one pod's resolution problem is that pod's ----------------------------------

EBPF = Features(ebpf=True, skmsg=True, ebpf_reason="probed", skmsg_reason="probed")


class _Core:
    """CoreV1Api as the agent uses it here: records Events."""

    events: ClassVar[list[Any]] = []

    def __init__(self, api_client: object) -> None:
        pass

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        raise AssertionError("the test feeds the reflectors itself")

    list_namespace = list_pod_for_all_namespaces
    list_service_for_all_namespaces = list_pod_for_all_namespaces
    list_endpoints_for_all_namespaces = list_pod_for_all_namespaces
    list_node = list_pod_for_all_namespaces

    def create_namespaced_event(self, namespace: str, event: Any) -> None:
        self.events.append(event)


def kube_agent(
    tmp_path: Path, node: Node, monkeypatch: pytest.MonkeyPatch, root: Path | None = None
) -> KubeAgent:
    import kubernetes.client

    _Core.events = []
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", _Core)
    return KubeAgent(
        None,
        "worker-2",
        root or node.root,
        NodeDatapath(kernel=RecordingKernel(), features=EBPF, bpf_state_file=tmp_path / "b"),
        envoy_admin=str(tmp_path / "no-envoy.sock"),
        status_file=tmp_path / "agent-status.json",
        proc=node.proc,
    )


def feed(agent: KubeAgent, *pods: dict[str, Any]) -> None:
    namespace = {"metadata": {"name": "shop", "labels": {"steer.dev/inject": "enabled"}}}
    items = {"local-pods": pods, "pods": pods, "namespaces": [namespace], "httppolicies": []}
    for kind, objects in items.items():
        agent.reflectors[kind].items = {str(i): o for i, o in enumerate(objects)}


def test_one_pods_unreadable_netns_fails_only_that_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = build_node(tmp_path, HYBRID_CGROUP_ROOT)
    good = api_pod(HYBRID_CGROUP_ROOT)
    bad = api_pod(HYBRID_CGROUP_ROOT, uid=NEIGHBOUR_UID)
    bad["metadata"]["name"], bad["status"]["podIP"] = "payments-0", "10.244.2.18"
    # Every process of the neighbour pod: ns/net an error no retry fixes (a symlink loop
    # here, ELOOP), neither "gone" nor "permission denied".
    for pid in (SANDBOX_PID + 1000, APP_PID + 1000, PROXY_PID + 1000):
        link = node.proc / str(pid) / "ns" / "net"
        link.unlink()
        link.symlink_to(link)
    agent = kube_agent(tmp_path, node, monkeypatch)
    feed(agent, good, bad)

    report = agent.sync()
    assert report.dataplanes["shop/checkout-7d4b9c6f5-x2lqp"][0] == "ebpf"
    dataplane, reason = report.dataplanes["shop/payments-0"]
    assert (dataplane, reason) == (
        "iptables",
        "annotation asks for ebpf, but the pod's cgroup is not known",
    )
    [event] = _Core.events
    assert event.involved_object.name == "payments-0"
    assert event.reason == "SteeringCgroupUnknown"
    assert (
        "cannot be read" in event.message and "Too many levels of symbolic links" in event.message
    )


def test_a_pod_deeper_than_connect4_looks_stays_on_iptables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attached but never matched by connect4, its connects would go out unsteered. The
    # agent is given the deep kubelet root: levels count from the hierarchy's top.
    deep = "/".join(f"l{i}" for i in range(MAX_POD_CGROUP_LEVEL - 2))
    layout = Layout("Burstable", "containerd", f"{deep}/kubepods/burstable/pod{UID}", "{id}")
    node = build_node(tmp_path, layout)
    agent = kube_agent(tmp_path, node, monkeypatch, root=node.root / deep)
    feed(agent, api_pod(layout))
    assert cgroup_level(node.pod_dir) == MAX_POD_CGROUP_LEVEL + 1
    report = agent.sync()
    assert report.dataplanes["shop/checkout-7d4b9c6f5-x2lqp"][0] == "iptables"
    [event] = _Core.events
    assert f"deeper than the {MAX_POD_CGROUP_LEVEL}" in event.message
