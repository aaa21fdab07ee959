"""The node agent: keeps the node's steering in line with policies and pods.

Each sync resolves the current inputs, picks each pod's datapath, updates the eBPF maps
and the iptables rules where they changed, and then revokes exactly the live flows whose
verdict the change alters. A sync that fails leaves the previous state in force (the
restore is atomic per table) and is retried on the next change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from watchfiles import watch

from steer.atomicfile import write_json_atomic
from steer.constants import AGENT_STATUS_FILE, IPV6_POLICY
from steer.idlegc import IdleCollector
from steer.model.pod import Pod
from steer.node.datapath import NodeDatapath, SyncReport
from steer.source.local import LocalInputs

log = logging.getLogger("steer.agent")


@dataclass
class LocalAgent:
    inputs: LocalInputs
    status_file: Path = AGENT_STATUS_FILE
    datapath: NodeDatapath = field(default_factory=NodeDatapath)
    _loaded_at: float = 0.0
    # Exceptions the run loop survived (logged with their traceback), for `steer status`.
    loop_errors: int = 0

    def sync(self) -> SyncReport:
        self._loaded_at = time.time()
        reload, pods = self.inputs.load()
        report = self.datapath.sync(reload.policies, pods, self.inputs.node_cgroup())
        report.errors = [str(e) for e in reload.errors] + report.errors
        self._write_status(pods, report)
        return report

    def _write_status(self, pods: Sequence[Pod], report: SyncReport) -> None:
        unsteered = ("none", "steer.dev/inject is disabled for this pod or its namespace")
        counters = self.datapath.ebpf_counters()
        status = {
            "pods": [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "ip": p.ip,
                    "dataplane": report.dataplanes.get(p.key, unsteered)[0],
                    "reason": report.dataplanes.get(p.key, unsteered)[1],
                    "ebpf_counters": counters.get(p.key),
                }
                for p in pods
            ],
            "features": asdict(self.datapath.features),
            "ipv6": IPV6_POLICY,
            # Shallow: asdict deep-copies a thousand pods' datapath reasons on every sync.
            "last_sync": {f.name: getattr(report, f.name) for f in fields(report)},
            "ruleset_digest": self.datapath.iptables.applied_digest,
            "policy_digest": self.inputs.policies.digest(),
            "loaded_at": self._loaded_at,
            "loop_errors": self.loop_errors,
        }
        write_json_atomic(self.status_file, status, compact=True)

    def run(self) -> None:
        """Sync now and after every change to the inputs, until interrupted.

        Synchronous on purpose: every kernel call must run on a thread inside the node's
        network namespace, and pyroute2's blocking API cannot run inside an event loop.
        """
        collector = IdleCollector()
        self._survive(collector)
        while True:
            try:
                paths = self.inputs.watch_paths()
                for changes in watch(
                    *paths,
                    debounce=10,
                    step=2,
                    recursive=False,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                ):
                    if self.inputs.affected_by(path for _, path in changes):
                        self._survive(collector)
                    else:
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
