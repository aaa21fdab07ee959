"""The node agent: keeps the node's steering in line with policies and pods.

Each sync resolves the current inputs, renders the ruleset, applies it only if it changed,
and then revokes exactly the live flows whose verdict the change alters. A sync that
fails leaves the previous rules in force (the restore is atomic per table) and is retried
on the next change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError
from watchfiles import watch

from steer.constants import RUN_DIR
from steer.model.enforce import Enforcement, decide_flow, resolve
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.node import conntrack, iptables
from steer.render.iptables import Ruleset, render_ruleset
from steer.source.local import LocalInputs, write_json_atomic

log = logging.getLogger("steer.agent")
STATUS_FILE = RUN_DIR / "agent-status.json"


@dataclass
class SyncReport:
    applied: bool
    rules: int
    revoked: int
    apply_ms: float
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class IptablesDatapath:
    """Owns steer's iptables state in the current network namespace."""

    applied_digest: str | None = None
    applied: Ruleset | None = None
    enforcement: Enforcement | None = None

    def sync(self, policies: Sequence[HTTPPolicy], pods: Sequence[Pod]) -> SyncReport:
        enforcement = resolve(policies, pods)
        ruleset = render_ruleset(enforcement)
        report = SyncReport(False, len(ruleset.rules), 0, 0.0, warnings=list(enforcement.warnings))
        if ruleset.digest() == self.applied_digest:
            return report
        started = time.perf_counter()
        try:
            iptables.apply(ruleset, self.applied)
        except iptables.IptablesError as exc:
            report.errors.append(str(exc))
            log.error("rules not applied, previous rules stay in force: %s", exc)
            return report
        report.apply_ms = (time.perf_counter() - started) * 1000
        report.applied = True
        self.applied_digest = ruleset.digest()
        self.applied = ruleset
        self.enforcement = enforcement
        try:
            revoked = conntrack.revoke(lambda f: decide_flow(enforcement, f.src, f.dst, f.dport))
        except (OSError, NetlinkError) as exc:  # the rules are in; flows age out instead
            report.errors.append(f"revoking flows failed: {exc}")
            log.error("rules applied, but revoking affected flows failed: %s", exc)
            return report
        report.revoked = len(revoked)
        for flow in revoked:
            log.info(
                "revoked %s:%d -> %s:%d (was verdict %d)",
                flow.src,
                flow.sport,
                flow.dst,
                flow.dport,
                flow.verdict,
            )
        return report

    def plan(self, policies: Sequence[HTTPPolicy], pods: Sequence[Pod]) -> Ruleset:
        return render_ruleset(resolve(policies, pods))

    def unload(self) -> None:
        iptables.unload()
        self.applied_digest = None
        self.applied = None


@dataclass
class LocalAgent:
    inputs: LocalInputs
    status_file: Path = STATUS_FILE
    datapath: IptablesDatapath = field(default_factory=IptablesDatapath)
    _loaded_at: float = 0.0

    def sync(self) -> SyncReport:
        self._loaded_at = time.time()
        reload, pods = self.inputs.load()
        report = self.datapath.sync(reload.policies, pods)
        report.errors = [str(e) for e in reload.errors] + report.errors
        self._write_status(pods, report)
        return report

    def _write_status(self, pods: Sequence[Pod], report: SyncReport) -> None:
        status = {
            "pods": [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "ip": p.ip,
                    "dataplane": "iptables",
                    "reason": "the eBPF datapath is not available in this build",
                }
                for p in pods
            ],
            "last_sync": asdict(report),
            "ruleset_digest": self.datapath.applied_digest,
            "policy_digest": self.inputs.policies.digest(),
            "loaded_at": self._loaded_at,
        }
        write_json_atomic(self.status_file, status)

    def run(self) -> None:
        """Sync now and after every change to the inputs, until interrupted.

        Synchronous on purpose: every kernel call must run on a thread inside the node's
        network namespace, and pyroute2's blocking API cannot run inside an event loop.
        """
        self._log(self.sync())
        paths = self.inputs.watch_paths()
        for changes in watch(*paths, debounce=10, step=5, recursive=False):
            if self.inputs.affected_by(path for _, path in changes):
                self._log(self.sync())

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
