"""The node agent: keeps the node's steering in line with policies and pods.

Each sync resolves the current inputs, picks each pod's datapath, updates the eBPF maps
and the iptables rules where they changed, and then revokes exactly the live flows whose
verdict the change alters. A sync that fails leaves the previous state in force (the
restore is atomic per table) and is retried on the next change.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from steer.atomicfile import write_json_atomic
from steer.constants import (
    AGENT_STATUS_FILE,
    ENVOY_ADMIN_SOCKET,
    IPV6_POLICY,
    LAB_GATEWAY_IP,
    LAB_POD_CIDR,
    METRICS_PORT,
)
from steer.idlegc import IdleCollector
from steer.metrics import AgentMetrics, ReadAtScrape, ebpf_metrics, serve_metrics
from steer.model.pod import Pod
from steer.model.service import Frontend, Problem, Service, ServiceProblem, frontends
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.envoy import admin_get
from steer.node.observe import Observability
from steer.source.local import LocalInputs

log = logging.getLogger("steer.agent")

UNSTEERED = ("none", "steer.dev/inject is disabled for this pod or its namespace")
# How long an agent waits for `steer status` readers to let go of the lock (they hold it
# for microseconds) before it writes without it.
_LOCK_WAIT_S = 1.0


def status_document(
    pods: Iterable[Pod],
    report: SyncReport,
    datapath: NodeDatapath,
    *,
    loaded_at: float,
    loop_errors: int,
    pod_fields: Mapping[str, Mapping[str, object]] | None = None,
    **extra: object,
) -> dict[str, Any]:
    """The agent's status for `steer status`, the same shape on the local node and in a
    cluster: one entry per pod of this node (`pods`: only those), the node's features, the
    last sync and the applied ruleset's digest. `pod_fields` adds fields to a pod's entry
    (by pod key), `extra` top-level ones (what only one kind of agent knows).

    Built afresh on every sync and kept flat: at 1k pods this and the compact encoding
    cost a few milliseconds, where asdict() or an indented encoding cost tens."""
    counters = datapath.ebpf_counters()
    more = pod_fields or {}
    entries = []
    for p in pods:
        dataplane, reason = report.dataplanes.get(p.key, UNSTEERED)
        entry: dict[str, object] = {
            "name": p.name,
            "namespace": p.namespace,
            "ip": p.ip,
            "dataplane": dataplane,
            "reason": reason,
            "ebpf_counters": counters.get(p.key),
        }
        if p.key in more:
            entry.update(more[p.key])
        entries.append(entry)
    return {
        "pods": entries,
        "features": asdict(datapath.features),
        "ipv6": IPV6_POLICY,
        # Shallow: asdict deep-copies a thousand pods' datapath reasons on every sync.
        "last_sync": {f.name: getattr(report, f.name) for f in fields(report)},
        "ruleset_digest": datapath.iptables.applied_digest,
        # Times another tool changed steer's chains and they were written again.
        "iptables_repairs": datapath.iptables.repairs,
        "loaded_at": loaded_at,
        "loop_errors": loop_errors,
        **extra,
    }


def map_full_problems(found: Sequence[Frontend], fallbacks: Sequence[str]) -> list[ServiceProblem]:
    """The frontends the eBPF map could not hold, as problems of their Services."""
    return [
        ServiceProblem(
            f.service,
            Problem.MAP_FULL,
            f"{f.ip}:{f.port} did not fit in the node's Service map: kube-proxy serves it, "
            "and flows are decided after its DNAT. Fix: raise BPF_MAX_SERVICE_ENTRIES",
        )
        for f in found
        if f.label in fallbacks
    ]


def service_status(
    services: Sequence[Service],
    found: Sequence[Frontend],
    problems: Sequence[ServiceProblem],
    fallbacks: Sequence[str],
    listeners: Mapping[str, int] | None = None,
) -> list[dict[str, object]]:
    """Each Service for `steer status`: its addresses, each port's backends and Envoy
    listener (`listeners`: by "namespace/name:port name"), and what is wrong with it
    (the same reasons the agent reports as Events in a cluster)."""
    listeners = listeners or {}
    by_service: dict[str, list[Frontend]] = {}
    for frontend in found:
        by_service.setdefault(frontend.service, []).append(frontend)
    entries: list[dict[str, object]] = []
    for service in sorted(services, key=lambda s: s.key):
        mine = by_service.get(service.key, [])
        entries.append(
            {
                "name": service.name,
                "namespace": service.namespace,
                "type": service.type.value,
                "cluster_ip": str(service.cluster_ip) if service.cluster_ip else None,
                "frontends": [
                    {
                        "address": f"{f.ip}:{f.port}",
                        "port_name": f.port_name,
                        "node_port": f.node_port,
                        "backends": [f"{b.ip}:{b.port}" for b in f.backends],
                        "balanced_by": ("kube-proxy" if f.label in fallbacks else "connect4"),
                        # Where its flows that need Envoy arrive, telling Envoy the Service.
                        "envoy_listener": listeners.get(f"{f.service}:{f.port_name}"),
                    }
                    for f in mine
                ],
                "problems": [
                    {"reason": p.problem.value, "message": p.message}
                    for p in problems
                    if p.service == service.key
                ],
            }
        )
    return entries


class StatusWriter:
    """Writes the agent's status document whole (a reader sees the old one or the new one),
    and holds an exclusive lock on `<file>.lock` for as long as the agent lives.

    The document names the lock, so `steer status` can tell the file of a running agent
    from one left behind by an agent that stopped or crashed: the kernel drops the lock
    with the process, even after kill -9, and a left-behind file's lock is free. (The local
    agent writes only when something changes, so the file's age says nothing.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(f"{path.name}.lock")
        self._lock_fd: int | None = None
        self._lock_tried = False

    def write(self, document: dict[str, Any]) -> None:
        if not self._lock_tried:
            self._lock_tried = True
            self._lock_fd = _hold_lock(self.lock_path)
        if self._lock_fd is not None:
            document["lock"] = str(self.lock_path)
        write_json_atomic(self.path, document, compact=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _hold_lock(path: Path) -> int | None:
    """An exclusive lock on `path`, kept open (close-on-exec: the agent's children must not
    keep it after it dies); None if another agent holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    os.close(fd)
    log.warning(
        "another agent holds %s: two agents write the same status file; steer status "
        "shows whichever wrote last. Fix: stop the other agent",
        path,
    )
    return None


def observe_view(
    observability: Observability | None,
    pods: Sequence[Pod],
    report: SyncReport,
    datapath: NodeDatapath,
) -> None:
    """After a sync: who is who, for the events of the requests that follow."""
    if observability is not None:
        installed = datapath.ebpf.installed if datapath.ebpf is not None else {}
        observed = datapath.ebpf.observed if datapath.ebpf is not None else {}
        observability.update(
            pods,
            {key: dataplane for key, (dataplane, _) in report.dataplanes.items()},
            datapath.iptables.enforcement,
            {slot: key for key, (_, slot, _) in installed.items()},
            frozenset(p.ip for p in pods if p.key in installed or p.key in observed),
        )
        now = time.time()
        for source in report.revoked_flows:
            observability.revoked.remember(source, now)


@contextlib.contextmanager
def observing(
    metrics: AgentMetrics, datapath: NodeDatapath, envoy_admin: str, netns: str = ""
) -> Iterator[Observability | None]:
    """The agent's event servers and metrics endpoint while it runs. Failing to start one
    (a socket path or a port that cannot be bound) costs `steer observe` or the metrics,
    never steering."""
    observability: Observability | None = None
    try:
        started = Observability(
            on_events=metrics.observe_events,
            inbound=True,
            on_lost=metrics.inbound_lost,
            # The datapath's namespace: its flows are the ones to read.
            netns=netns,
        )
        started.start()
        observability = started
    except (OSError, RuntimeError) as exc:
        log.error("steer observe is unavailable: %s", exc)
    ring = observability.ring if observability is not None else None
    metrics.registry.register(
        ReadAtScrape(
            lambda: ebpf_metrics(
                datapath.ebpf_counters(),
                ring.evicted if ring else 0,
                datapath.ebpf_map_fill(),
            )
        )
    )
    stop_metrics = None
    try:
        stop_metrics = serve_metrics(
            metrics.registry,
            METRICS_PORT,
            envoy_stats=lambda: admin_get("/stats/prometheus", envoy_admin),
        )
    except OSError as exc:
        log.error("metrics are unavailable on port %d: %s", METRICS_PORT, exc)
    try:
        yield observability
    finally:
        if stop_metrics is not None:
            stop_metrics()
        if observability is not None:
            observability.stop()


@dataclass
class LocalAgent:
    inputs: LocalInputs
    status_file: Path = AGENT_STATUS_FILE
    datapath: NodeDatapath = field(default_factory=NodeDatapath)
    _loaded_at: float = 0.0
    # Exceptions the run loop survived (logged with their traceback), for `steer status`.
    loop_errors: int = 0
    _status: StatusWriter | None = None
    collector: IdleCollector = field(default_factory=IdleCollector)
    # Service problems already logged: each is logged once, when it appears.
    _problems_logged: set[ServiceProblem] = field(default_factory=set)
    # Envoy's access log stream and `steer observe`'s socket, from `run`.
    observability: Observability | None = None
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    envoy_admin: str = str(ENVOY_ADMIN_SOCKET)

    def sync(self) -> SyncReport:
        self._loaded_at = time.time()
        started = time.perf_counter()
        reload, pods = self.inputs.load()
        services = self.inputs.services()
        found, problems = frontends(
            services, [IPv4Network(LAB_POD_CIDR)], [IPv4Address(LAB_GATEWAY_IP)]
        )
        loaded = time.perf_counter()
        report = self.datapath.sync(
            reload.policies,
            pods,
            self.inputs.node_cgroup(),
            services=found,
            pod_cidrs=[IPv4Network(LAB_POD_CIDR)],
        )
        report.phases_ms["load"] = (loaded - started) * 1000
        report.errors = [str(e) for e in reload.errors] + report.errors
        observe_view(self.observability, pods, report, self.datapath)
        self.metrics.observe_sync(time.perf_counter() - started, report.revoked, len(report.errors))
        problems = problems + map_full_problems(found, report.service_fallbacks)
        for problem in problems:
            if problem not in self._problems_logged:
                log.warning("service %s: %s", problem.service, problem.message)
        self._problems_logged = set(problems)
        with report.phase("status"):
            self._write_status(
                pods,
                report,
                service_status(
                    services, found, problems, report.service_fallbacks, report.service_listeners
                ),
            )
        return report

    def _write_status(
        self, pods: Sequence[Pod], report: SyncReport, services: list[dict[str, object]]
    ) -> None:
        if self._status is None or self._status.path != self.status_file:
            self._status = StatusWriter(self.status_file)
        document = status_document(
            pods,
            report,
            self.datapath,
            loaded_at=self._loaded_at,
            loop_errors=self.loop_errors,
            mode="local",
            policy_digest=self.inputs.policies.digest(),
            gc=self.collector.status(),
            services=services,
        )
        self._status.write(document)

    def run(self, stop: threading.Event | None = None) -> None:
        """Sync now and after every change to the inputs, until interrupted or `stop` is
        set (looked at least once a second).

        Synchronous on purpose: every kernel call must run on a thread inside the node's
        network namespace, and pyroute2's blocking API cannot run inside an event loop.
        """
        collector = self.collector
        with observing(self.metrics, self.datapath, self.envoy_admin) as self.observability:
            self._run(collector, stop)

    def _run(self, collector: IdleCollector, stop: threading.Event | None) -> None:
        self._survive(collector)
        while True:
            try:
                for due in self.inputs.watch():
                    if stop is not None and stop.is_set():
                        return
                    if due or self.datapath.drifted():
                        self._survive(collector)
                    # Also after a change: under churn there is never a quiet batch.
                    collector.tick()
                return
            except Exception:  # the watch itself failed (a watched directory went away)
                self.loop_errors += 1
                log.exception("watching the inputs failed; watching again in 1 s")
            time.sleep(1.0)
            self._survive(collector)

    def _survive(self, collector: IdleCollector) -> None:
        """One sync; an exception is logged with its traceback and counted, and the loop goes
        on with the next change: whatever one change brings must never stop the agent
        (the kernel keeps the rules and maps of the last sync that succeeded)."""
        try:
            with collector.change():
                self._log(self.sync())
        except Exception:
            self.loop_errors += 1
            log.exception("sync failed (%d so far); waiting for the next change", self.loop_errors)

    @staticmethod
    def _log(report: SyncReport) -> None:
        if report.applied:
            log.info(
                "applied %d rules in %.1f ms, revoked %d flows",
                report.rules,
                report.apply_ms,
                report.revoked,
            )
        for warning in report.warnings:
            log.warning("%s", warning)
