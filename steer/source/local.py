"""Local mode: policies from a directory of YAML files, pods from the lab's state file."""

from __future__ import annotations

import hashlib
import logging
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypedDict

from watchfiles import Change, awatch, watch

from steer.lab.spec import LabPod, LabPodCache, LabState
from steer.model.load import PolicyError, parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.model.service import PodPorts, Service

log = logging.getLogger("steer.source")


class _WatchOptions(TypedDict):
    debounce: int
    step: int
    recursive: bool
    rust_timeout: int
    yield_on_timeout: bool


# step: how long to wait for more events once one came; a policy write (temp file, rename)
# is over within a millisecond, and every millisecond here is latency. A batch comes at
# least every second (empty when nothing happened), for `LocalInputs.stale`.
_WATCH_OPTIONS: _WatchOptions = {
    "debounce": 10,
    "step": 2,
    "recursive": False,
    "rust_timeout": 1000,
    "yield_on_timeout": True,
}
POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PolicyReload:
    policies: tuple[HTTPPolicy, ...]
    errors: tuple[PolicyError, ...]
    changed: bool


@dataclass
class PolicyDirectory:
    """The policies in force, per file: a file that fails to load keeps its last good
    content in force, so one bad edit never half-applies and never drops good policy."""

    path: Path
    _good: dict[str, tuple[HTTPPolicy, ...]] = field(default_factory=dict)
    _texts: dict[str, str] = field(default_factory=dict)
    _digest: str | None = None
    # Every policy file as last read (good or not), with its inode, mtime and size.
    _read: dict[str, str] = field(default_factory=dict)
    _stats: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def digest(self) -> str:
        """Digest of the files in force (a rejected edit does not count). Computed once per
        change: status writers ask for it every 100 ms, and at 10k rules hashing every
        policy text each time cost a steady 3% of a core."""
        if self._digest is None:
            self._digest = texts_digest({n: t for n, t in self._texts.items() if n in self._good})
        return self._digest

    def reload(self) -> PolicyReload:
        errors: list[PolicyError] = []
        if not self.path.is_dir():
            # A vanished directory is far more likely a mistake than an intent to drop
            # every policy at once; keep what is in force and say so.
            error = PolicyError(str(self.path), "", "not a directory; fix: create it")
            log.error("policies unchanged: %s", error)
            return PolicyReload(self._in_force(), (error,), False)
        present: dict[str, str] = {}
        stats: dict[str, tuple[int, int, int]] = {}
        for file in self._files():
            name = str(file)
            try:
                stamp = _stamp(file)
                if stamp is None:
                    continue
                stats[name] = stamp
                # A file that was not replaced or written since the last reload is not read
                # again: at a hundred files, reading them all was most of a reload.
                if self._stats.get(name) == stats[name] and name in self._read:
                    present[name] = self._read[name]
                else:
                    present[name] = file.read_text()
            except FileNotFoundError:  # removed since the directory was listed
                stats.pop(name, None)
            except (OSError, UnicodeDecodeError) as exc:
                # The stat stays: `stale` must not call for a reload every second over a
                # file that stays unreadable (it is read again on its next change).
                errors.append(PolicyError(name, "", f"unreadable: {exc}; fix: check it"))
        self._stats, self._read = stats, present

        unchanged = [n for n in present if n in self._good and self._texts[n] == present[n]]
        edited = [n for n in present if n not in unchanged]
        good: dict[str, tuple[HTTPPolicy, ...]] = {n: self._good[n] for n in unchanged}
        texts = {n: self._texts[n] for n in unchanged}
        # Unchanged files keep the names they own; edited files are checked against them
        # and against each other in name order, so a rename frees its old name at once.
        owners = {p.key: n for n in unchanged for p in good[n]}
        for name in edited:
            try:
                policies, file_errors = parse_policies(present[name], name)
            except Exception as exc:  # parse_policies never raises; should it, one file fails
                log.exception("loading %s failed", name)
                policies = []
                file_errors = [
                    PolicyError(name, "", f"could not be loaded ({exc!r}); fix: check the file")
                ]
            file_errors += [
                PolicyError(
                    name,
                    "metadata.name",
                    f"policy {p.key} is already defined in {owners[p.key]}; fix: rename one",
                )
                for p in policies
                if p.key in owners
            ]
            if not file_errors:
                good[name], texts[name] = tuple(policies), present[name]
            else:
                errors += file_errors
                last_good = self._good.get(name, ())
                if name in self._good and not any(p.key in owners for p in last_good):
                    good[name], texts[name] = last_good, self._texts[name]
            owners.update({p.key: name for p in good.get(name, ())})

        changed = good != self._good or texts != self._texts
        self._good, self._texts = good, texts
        if changed:
            self._digest = None
        for error in errors:
            log.error("policy not applied: %s", error)
        return PolicyReload(self._in_force(), tuple(errors), changed)

    def changed_on_disk(self) -> bool:
        """Whether a policy file was added, removed or written since the last reload."""
        try:
            now = {str(f): _stamp(f) for f in self._files()}
        except OSError:  # a directory that went away: the watch restarts on it
            return False
        return {n: s for n, s in now.items() if s is not None} != self._stats

    def _files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix in POLICY_SUFFIXES)

    def _in_force(self) -> tuple[HTTPPolicy, ...]:
        return tuple(p for name in sorted(self._good) for p in self._good[name])


@dataclass
class LocalInputs:
    """Everything local mode renders from: the policy directory and the lab's pods."""

    policy_dir: Path
    lab_state: Path

    def __post_init__(self) -> None:
        self.policies = PolicyDirectory(self.policy_dir)
        self._pods: list[Pod] = []
        self._lab_pods = LabPods()
        self._lab_text: str | None = None
        self._lab_stat: tuple[int, int, int] | None = None
        self._node_cgroup = ""

    def load(self) -> tuple[PolicyReload, list[Pod]]:
        """Current policies and pods. Errors are in the reload's errors; an unreadable lab
        state keeps the last good pods, so a bad write never unsteers the node."""
        reload = self.policies.reload()
        try:
            self._lab_stat = _stamp(self.lab_state)
        except OSError:
            self._lab_stat = None
        try:
            text = read_lab_state(self.lab_state)
            if text != self._lab_text:
                # Unchanged text, the very same Pod objects: resolving then skips the pods.
                self._pods, self._node_cgroup = self._lab_pods.parse(text)
                self._lab_text = text
        except LabStateError as exc:
            error = PolicyError(str(self.lab_state), "", f"{exc}; fix: steer lab up")
            log.error("pods unchanged: %s", error)
            reload = replace(reload, errors=(*reload.errors, error))
        return reload, self._pods

    def services(self) -> list[Service]:
        """The lab's Services as of the last `load`, with their endpoints."""
        return self._lab_pods.services

    def node_cgroup(self) -> str:
        """The cgroup of the node's Envoy, where the eBPF datapath attaches its hooks."""
        if self._lab_text is None:
            return load_lab_node_cgroup(self.lab_state)
        return self._node_cgroup

    def watch_paths(self) -> list[Path]:
        """Directories to watch, non-recursively (the lab state's holds logs too)."""
        return [p for p in (self.policy_dir, self.lab_state.parent) if p.exists()]

    def stale(self) -> bool:
        """Whether a policy file or the lab state changed since the last load, by their
        inode, mtime and size (a hundred stats). For a watcher to call when no event came:
        a write between a load and the moment the watch is set up sends no event, and
        the node then ran its old inputs until the next write."""
        try:
            lab = _stamp(self.lab_state)
        except OSError:
            lab = None
        return self.policies.changed_on_disk() or lab != self._lab_stat

    def watch(self) -> Iterator[bool]:
        """After every batch of file events, and after each second without one: whether
        the inputs must be loaded again. Synchronous, for the agent (see `awatch`)."""
        for changes in watch(*self.watch_paths(), **_WATCH_OPTIONS):
            yield self._due(changes)

    async def awatch(self) -> AsyncIterator[bool]:
        """`watch` for an event loop (the control plane)."""
        async for changes in awatch(*self.watch_paths(), **_WATCH_OPTIONS):
            yield self._due(changes)

    def _due(self, changes: set[tuple[Change, str]]) -> bool:
        # No event for a second: check by hand, since a write made before the watch was
        # set up sends none.
        return self.affected_by(path for _, path in changes) or (not changes and self.stale())

    def affected_by(self, changed_paths: Iterable[str]) -> bool:
        """Whether a batch of file events can change what is loaded. Files other than
        policies (a writer's staged copy, an editor's swap file) do not: reacting to them
        costs a whole reload, sometimes just ahead of the rename that matters."""
        return any(
            (Path(p).parent == self.policy_dir and Path(p).suffix in POLICY_SUFFIXES)
            or Path(p) == self.lab_state
            for p in changed_paths
        )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """A regular file's inode, mtime and size: what a rewrite (even by rename) changes.
    None if it is missing or not a regular file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size) if stat.S_ISREG(info.st_mode) else None


def texts_digest(texts: dict[str, str]) -> str:
    """Identifies a set of policy files by content, so a caller can tell whether the
    agent and control plane have caught up with the directory as it is now."""
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(f"{Path(name).name}\0{texts[name]}\0".encode())
    return h.hexdigest()[:16]


def directory_texts(path: Path) -> dict[str, str]:
    return {
        str(f): f.read_text()
        for f in sorted(path.iterdir())
        if f.suffix in POLICY_SUFFIXES and f.is_file()
    }


class LabStateError(ValueError):
    pass


def load_lab_pods(state_file: Path) -> list[Pod]:
    """Pods of the local lab; none if the lab is not up. Raises LabStateError if the file
    is not what `steer lab up` writes."""
    return parse_lab_state(read_lab_state(state_file))[0]


def read_lab_state(state_file: Path) -> str:
    """The lab state's text; "" if the lab is not up."""
    try:
        return state_file.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise LabStateError(f"lab state unreadable: {exc}") from None


def parse_lab_state(text: str) -> tuple[list[Pod], str]:
    """The lab's pods and the cgroup of its node's processes ("" if unknown). Raises
    LabStateError if the text is not what `steer lab up` writes."""
    return LabPods().parse(text)


class LabPods:
    """`parse_lab_state` for a caller that parses again and again (the agent, the control
    plane): a pod whose entry did not change comes back as the very same Pod object, so
    the resolver skips it, and only changed entries are parsed."""

    def __init__(self) -> None:
        self._entries = LabPodCache()
        self._pods: dict[int, tuple[LabPod, Pod]] = {}
        # The lab's Services, endpoints resolved against its pods, as of the last parse.
        self.services: list[Service] = []

    def parse(self, text: str) -> tuple[list[Pod], str]:
        try:
            state = LabState.from_text(text, self._entries)
        except ValueError as exc:
            raise LabStateError(str(exc)) from None
        self._entries.forget_unseen()
        if state is None:
            self._pods = {}
            self.services = []
            return [], ""
        known: dict[int, tuple[LabPod, Pod]] = {}
        pods = []
        for entry in state.pods:
            cached = self._pods.get(id(entry))
            if cached is None or cached[0] is not entry:
                cached = (entry, _pod(entry))
            known[id(entry)] = cached
            pods.append(cached[1])
        self._pods = known
        if state.services:
            ports = [
                PodPorts(
                    f"{e.namespace}/{e.name}",
                    e.namespace,
                    IPv4Address(e.ip),
                    e.labels,
                    e.ports,
                )
                for e in state.pods
            ]
            self.services = [s.model(ports) for s in state.services]
        else:
            self.services = []
        return pods, state.node_cgroup


def _pod(entry: LabPod) -> Pod:
    return Pod(
        name=entry.name,
        namespace=entry.namespace,
        ip=entry.ip,
        labels=dict(entry.labels),
        annotations=dict(entry.annotations),
        interface=entry.veth,
        namespace_labels=dict(entry.namespace_labels),
        cgroup=entry.cgroup,
        netns=entry.netns,
    )


def load_lab_node_cgroup(state_file: Path) -> str:
    """The cgroup the lab's node processes (Envoy) run in; empty if unknown."""
    try:
        return parse_lab_state(read_lab_state(state_file))[1]
    except LabStateError:
        return ""
