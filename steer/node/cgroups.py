"""Where cgroup v2 is mounted, and where a Kubernetes pod's cgroup v2 directory and
network namespace are on this node.

The eBPF datapath attaches its cgroup programs to a pod's cgroup, and revoking flows
(`ss -K`) runs in the pod's network namespace. Neither appears in the pod object the
API server returns, but both can be derived from it: the kubelet names the pod's cgroup
after the pod UID and QoS class, the container runtime names each container's cgroup
after its container ID, and any process of the pod leads to the pod's netns.

Inputs are pods as plain dicts, exactly as the API server sends them (no kubernetes
client types), the cgroup2 mount point, and the process table. The module only reads
the filesystem, so the tests run it against recorded layouts in a temporary directory.

Errors: the ``resolve_*`` functions raise :class:`ResolveError` with a message naming the
pod and everything tried, for the agent to show in ``steer status``. Their
``pod_cgroup``/``pod_netns`` counterparts return None instead when the answer is simply
not on this node (:class:`NotFoundError`), and still raise for a malformed pod object,
which no retry can fix.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from steer.constants import CGROUP2_CANDIDATES

PROC: Final = Path("/proc")
# How many directory levels below the cgroup root the fallback search looks for the pod's
# directory. kind's `kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/
# kubelet-kubepods-burstable-pod<uid>.slice` is 4; a node nested in a container scope
# under system.slice adds 2-3. The bound keeps a stray deep tree from costing a full walk.
WALK_MAX_DEPTH: Final = 8
# A container's own subtree is shallow: crun puts the processes in `<scope>/container`.
_CONTAINER_MAX_DEPTH: Final = 3
# connect4.c's STEER_MAX_CGROUP_LEVEL: how deep a pod's cgroup may be for connect4 to find
# it among a process's ancestors. A pod deeper than that would be attached but never
# matched, so its connects would go out unsteered; the agent keeps it on iptables instead.
MAX_POD_CGROUP_LEVEL: Final = 32

# A static pod's mirror on the API server gets a new metadata.uid; the kubelet names the
# cgroup after the static pod's own UID, which it publishes in this annotation.
MIRROR_ANNOTATION: Final = "kubernetes.io/config.mirror"

# status.qosClass -> the kubelet's QoS directory; Guaranteed pods sit directly in kubepods.
_QOS_DIRS: Final[Mapping[str, str | None]] = {
    "Guaranteed": None,
    "Burstable": "burstable",
    "BestEffort": "besteffort",
}
# containerID scheme -> names of a container's cgroup inside the pod's (systemd driver
# first, then cgroupfs). CRI-O prefixes "crio-" under both drivers (cri-o's cgmgr).
RUNTIME_CGROUP_NAMES: Final[Mapping[str, tuple[str, ...]]] = {
    "containerd": ("cri-containerd-{id}.scope", "{id}"),
    "cri-o": ("crio-{id}.scope", "crio-{id}"),
    "docker": ("docker-{id}.scope", "{id}"),
}
# CRI-O's conmon monitors sit in the pod's cgroup but run in the host's network
# namespace: a pid from there would point `ss -K` at the node's own sockets.
_CONMON_PREFIX: Final = "crio-conmon-"

# Only characters that can neither escape a directory nor be mangled by systemd's unit
# name escaping (a UID is a UUID, or 32 hex digits for a static pod).
_SAFE_UID: Final = re.compile(r"[0-9A-Za-z-]{1,128}")
_SAFE_CONTAINER_ID: Final = re.compile(r"[0-9A-Za-z]{1,128}")
# A pod's cgroup under either driver; pods never nest, so the search stops descending here.
_POD_DIR: Final = re.compile(r"pod[0-9A-Za-z-]+|.+-pod[0-9A-Za-z_]+\.slice")


class CgroupError(RuntimeError):
    """No cgroup v2 hierarchy where steer looks for one."""


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
    raise CgroupError(f"no cgroup2 mount at any of {[str(c) for c in CGROUP2_CANDIDATES]}")


def own_cgroup() -> Path | None:
    """This process's cgroup2 directory, if there is a cgroup2 hierarchy."""
    try:
        root = cgroup2_root()
    except CgroupError:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return None


class ResolveError(Exception):
    """A pod's cgroup or netns could not be resolved; ``str()`` is the operator message."""

    def __init__(self, pod: str, problem: str, tried: Sequence[str] = ()) -> None:
        self.pod = pod
        self.problem = problem
        self.tried = tuple(tried)
        message = f"pod {pod}: {problem}"
        if self.tried:
            message += "; tried: " + ", ".join(self.tried)
        super().__init__(message)


class NotFoundError(ResolveError):
    """Nothing for the pod on this node (not started yet, gone, host network): retry later."""


def pod_key(pod: Mapping[str, Any]) -> str:
    meta = _mapping(pod.get("metadata"))
    return f"{meta.get('namespace') or '?'}/{meta.get('name') or '?'}"


def pod_uid(pod: Mapping[str, Any]) -> str:
    """The UID the kubelet named the pod's cgroup after (the static UID for mirror pods)."""
    meta = _mapping(pod.get("metadata"))
    uid = _mapping(meta.get("annotations")).get(MIRROR_ANNOTATION) or meta.get("uid")
    if not isinstance(uid, str) or not _SAFE_UID.fullmatch(uid):
        raise ResolveError(pod_key(pod), f"metadata.uid {uid!r} is missing or not a UID")
    return uid


def pod_cgroup_candidates(pod: Mapping[str, Any], root: Path) -> list[Path]:
    """The pod's cgroup as the kubelet lays it out, in the order :func:`pod_cgroup` tries.

    For each base (``root``, then ``root/unified`` if that is a cgroup2 mount, as on
    hybrid hosts whose caller passed the top of /sys/fs/cgroup): the systemd driver's
    path, then the cgroupfs driver's. Without a known status.qosClass, every class.
    """
    uid = pod_uid(pod)
    systemd_uid = uid.replace("-", "_")  # "-" separates levels in systemd slice names
    qos_class = str(_mapping(pod.get("status")).get("qosClass"))
    qos_dirs = [_QOS_DIRS[qos_class]] if qos_class in _QOS_DIRS else list(_QOS_DIRS.values())
    relative: list[str] = []
    for qos in qos_dirs:
        if qos is None:
            relative.append(f"kubepods.slice/kubepods-pod{systemd_uid}.slice")
        else:
            relative.append(
                f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{systemd_uid}.slice"
            )
    relative += [f"kubepods/pod{uid}" if q is None else f"kubepods/{q}/pod{uid}" for q in qos_dirs]
    bases = [root]
    if _is_cgroup2_dir(root / "unified"):
        bases.append(root / "unified")
    return [base / rel for base in bases for rel in relative]


def resolve_pod_cgroup(pod: Mapping[str, Any], root: Path) -> Path:
    """The pod-level cgroup v2 directory, where the cgroup BPF programs are attached.

    Attempts, first hit wins:
      1. :func:`pod_cgroup_candidates`: the systemd and cgroupfs layouts under ``root``,
         then under ``root/unified``;
      2. a breadth-first search below ``root``, at most ``WALK_MAX_DEPTH`` levels deep,
         for a directory named ``pod<uid>`` (cgroupfs) or ``*-pod<uid_>.slice`` (systemd,
         any parent prefix). This covers ``--cgroup-root``, kind's ``kubelet.slice``
         and nodes nested in a container.
    Only cgroup v2 directories (those with ``cgroup.controllers``) count, so a hybrid
    host's v1 hierarchies are never returned or searched.

    Raises NotFoundError naming every path tried, ResolveError for a malformed pod.
    """
    tried: list[str] = []
    for candidate in pod_cgroup_candidates(pod, root):
        if _is_cgroup2_dir(candidate):
            return candidate
        tried.append(str(candidate))
    uid = pod_uid(pod)
    names = (f"pod{uid}", f"-pod{uid.replace('-', '_')}.slice")
    found = _search(root, lambda name: name == names[0] or name.endswith(names[1]))
    if found is not None:
        return found
    tried.append(f"a search of {root} to depth {WALK_MAX_DEPTH} for {names[0]} or *{names[1]}")
    raise NotFoundError(pod_key(pod), "no cgroup v2 directory for the pod", tried)


def pod_cgroup(pod: Mapping[str, Any], root: Path) -> Path | None:
    """:func:`resolve_pod_cgroup`, or None when the pod has no cgroup on this node."""
    try:
        return resolve_pod_cgroup(pod, root)
    except NotFoundError:
        return None


def container_cgroups(pod: Mapping[str, Any], root: Path) -> list[Path]:
    """The cgroups of the pod's containers that exist now, in status order (init first).

    Containers without a containerID (still waiting) or whose cgroup is gone (finished
    init containers) are left out; so are the sandbox (pause) and CRI-O's conmon scopes,
    which have no status entry. Raises ResolveError for a containerID that is malformed
    or from a runtime whose layout steer does not know.
    """
    pod_dir = pod_cgroup(pod, root)
    if pod_dir is None:
        return []
    found: list[Path] = []
    for runtime, container_id in _container_ids(pod):
        names = RUNTIME_CGROUP_NAMES.get(runtime)
        if names is None:
            raise ResolveError(
                pod_key(pod),
                f"container runtime {runtime!r} has no known cgroup layout; "
                f"steer knows {', '.join(RUNTIME_CGROUP_NAMES)}",
            )
        for name in names:
            if _is_cgroup2_dir(path := pod_dir / name.format(id=container_id)):
                found.append(path)
                break
    return found


def resolve_pod_netns(
    pod: Mapping[str, Any], root: Path, proc: Path = PROC, pod_dir: Path | None = None
) -> str:
    """The pod's network namespace as ``<proc>/<pid>/ns/net``, for `nsenter --net=`.

    All of a pod's containers share one netns, so any of its processes leads there. The
    sandbox's (pause) cgroup is tried first, because the pause process lives as long as
    the pod while app containers restart; then each container's, which are read afresh
    on every call, so a restarted container's new cgroup is found like the first one.
    Child cgroups with no process (a stopped container's, which runc may leave behind)
    simply yield nothing. A cgroup's subtree is read too (crun keeps the processes in
    ``<scope>/container``). Skipped: CRI-O's conmon scopes, pid 0 (a process outside the
    agent's pid namespace: the agent needs hostPID), any process in the caller's own
    netns (``<proc>/self``: the agent runs with hostNetwork, so that is the node's), and
    any whose ``ns/net`` the caller may not open (EACCES: named in the error's ``tried``).

    The node's netns is the caller's own, not ``<proc>/1``'s: PID 1 need not be in the
    node's netns (a node nested in a container or a namespace of its own, as the test
    node is), and on some machines no other process may open PID 1's namespaces at all.

    ``pod_dir``: the pod's cgroup, when the caller has resolved it already.

    The path is only as stable as the pid: when that process exits, the path is gone,
    and a recycled pid would name another process's netns. So record
    ``netns_inode(path)`` with the path, check it again right before acting, and
    re-resolve when it is None or different.

    Raises NotFoundError when nothing was found (naming the cgroups read), or for a
    hostNetwork pod, which has no netns of its own; ResolveError for a malformed pod.
    """
    if _mapping(pod.get("spec")).get("hostNetwork") is True:
        raise NotFoundError(
            pod_key(pod), "uses the node's network namespace (spec.hostNetwork); not steered"
        )
    if pod_dir is None:
        pod_dir = resolve_pod_cgroup(pod, root)
    node_netns = netns_inode(proc / "self" / "ns" / "net")
    tried: list[str] = []
    for cgroup in _netns_cgroup_order(pod, pod_dir):
        tried.append(str(cgroup))
        for pid in _pids_under(cgroup):
            path = proc / str(pid) / "ns" / "net"
            try:
                inode = netns_inode(path)
            except PermissionError:
                # One process the agent may not inspect (a capability it lacks) costs
                # that process, not the pod: another of the pod's may do.
                tried.append(f"{path} (permission denied)")
                continue
            if inode is not None and inode != node_netns:
                return str(path)
    raise NotFoundError(pod_key(pod), f"no live process in the pod's cgroup {pod_dir}", tried)


def pod_netns(
    pod: Mapping[str, Any], root: Path, proc: Path = PROC, pod_dir: Path | None = None
) -> str | None:
    """:func:`resolve_pod_netns`, or None when the pod has no netns to find on this node."""
    try:
        return resolve_pod_netns(pod, root, proc, pod_dir)
    except NotFoundError:
        return None


def cgroup_level(path: Path) -> int:
    """How deep ``path`` is in its cgroup v2 hierarchy (the root is 0), as the kernel
    counts for ``bpf_get_current_ancestor_cgroup_id``. Counted up to the mount's top, so
    it is right whether the hierarchy is at /sys/fs/cgroup or /sys/fs/cgroup/unified. The
    agent sees the host's mount (a hostPath), whose top is the real root."""
    level = 0
    while _is_cgroup2_dir(path.parent) and path.parent != path:
        path = path.parent
        level += 1
    return level


def netns_inode(path: str | os.PathLike[str]) -> int | None:
    """The inode identifying a network namespace (as `lsns` and `ip netns identify` use),
    or None when the path is gone (its process exited). Other errors, such as EACCES for
    an agent without CAP_SYS_PTRACE, are raised: they would not go away on a retry."""
    try:
        return Path(path).stat().st_ino
    except (FileNotFoundError, ProcessLookupError):
        return None


# --- helpers ------------------------------------------------------------------------------


def _mapping(value: object) -> Mapping[str, Any]:
    # Absent or null fields (status of a pod not yet scheduled) read as empty.
    return value if isinstance(value, Mapping) else {}


def _is_cgroup2_dir(path: Path) -> bool:
    # Every cgroup v2 directory, the root included, has cgroup.controllers; v1 never does.
    return (path / "cgroup.controllers").is_file()


def _subdirs(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            # Sorted, so that the search and the netns order do not depend on readdir order.
            return sorted(
                (e for e in entries if e.is_dir(follow_symlinks=False)), key=lambda e: e.name
            )
    except OSError:
        return []  # removed while we looked (a pod going away): nothing below it


def _search(root: Path, matches: Callable[[str], bool]) -> Path | None:
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    while queue:
        directory, depth = queue.popleft()
        for entry in _subdirs(directory):
            child = Path(entry.path)
            if not _is_cgroup2_dir(child):
                continue
            if matches(entry.name):
                return child
            if depth + 1 < WALK_MAX_DEPTH and not _POD_DIR.fullmatch(entry.name):
                queue.append((child, depth + 1))
    return None


def _container_ids(pod: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    status = _mapping(pod.get("status"))
    for field in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for container in status.get(field) or ():
            raw = _mapping(container).get("containerID")
            if not raw:
                continue  # not created yet
            runtime, sep, container_id = str(raw).partition("://")
            if not sep or not _SAFE_CONTAINER_ID.fullmatch(container_id):
                raise ResolveError(
                    pod_key(pod), f"{field} has containerID {raw!r}, not <runtime>://<id>"
                )
            yield runtime, container_id


def _netns_cgroup_order(pod: Mapping[str, Any], pod_dir: Path) -> list[Path]:
    """The pod's child cgroups: unknown ones (the sandbox) first, then the containers'."""
    known = {
        name.format(id=container_id)
        for runtime, container_id in _container_ids(pod)
        for name in RUNTIME_CGROUP_NAMES.get(runtime, ("{id}",))
    }
    children = [
        Path(e.path)
        for e in _subdirs(pod_dir)
        if not e.name.startswith(_CONMON_PREFIX) and _is_cgroup2_dir(Path(e.path))
    ]
    return [c for c in children if c.name not in known] + [c for c in children if c.name in known]


def _pids_under(cgroup: Path) -> Iterator[int]:
    queue: deque[tuple[Path, int]] = deque([(cgroup, 0)])
    while queue:
        directory, depth = queue.popleft()
        try:
            lines = (directory / "cgroup.procs").read_text().split()
        except OSError:
            lines = []  # the cgroup went away with its container
        for line in lines:
            if line.isascii() and line.isdigit() and int(line) > 0:
                yield int(line)
        if depth + 1 < _CONTAINER_MAX_DEPTH:
            queue.extend((Path(e.path), depth + 1) for e in _subdirs(directory))
