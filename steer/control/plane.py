"""The control plane in local mode: policy directory + lab pods -> snapshot -> ADS.

Rendering is pure (steer.render.xds); this module only watches inputs and feeds the cache.
A policy set that renders inconsistently is refused as a whole and the node keeps its
last good snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from steer.atomicfile import write_json_atomic
from steer.constants import CONTROL_STATUS_FILE, LAB_NODE_NAME, XDS_SOCKET
from steer.control.cache import InconsistentSnapshot, PushRejected, Snapshot, SnapshotCache
from steer.control.quarantine import Quarantine
from steer.control.xds import serve
from steer.idlegc import IdleCollector
from steer.metrics import ControlMetrics, serve_control_metrics
from steer.model.policy import HTTPPolicy
from steer.render.xds import SnapshotRenderer
from steer.source.local import LocalInputs

log = logging.getLogger("steer.control")
# With nothing changing, the status is still written this often (the collector's tick).
STATUS_IDLE_S = 1.0


@dataclass
class LocalControlPlane:
    inputs: LocalInputs
    node_id: str = LAB_NODE_NAME
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    status_file: Path = CONTROL_STATUS_FILE

    def __post_init__(self) -> None:
        self.errors: list[str] = []
        self._last_status: dict[str, object] | None = None
        self._renderer = SnapshotRenderer()
        self._gc = IdleCollector()
        self._loaded_at = 0.0
        self._render_ms = 0.0
        # Exceptions the run loop survived (logged with their traceback), for `steer status`.
        self.loop_errors = 0
        self._last_loop_error: tuple[str, str] | None = None
        self.quarantine = Quarantine()
        # The policies the node's current snapshot was rendered from.
        self._pushed: list[HTTPPolicy] = []
        self.metrics = ControlMetrics(self.cache)

    def refresh(self) -> bool:
        """Re-render from current inputs; True if the node's snapshot changed."""
        with self._gc.change():
            return self._refresh()

    def _refresh(self) -> bool:
        started = time.perf_counter()
        self._loaded_at = time.time()
        reload, pods = self.inputs.load()
        self.errors = [str(e) for e in reload.errors]
        admitted = self.quarantine.admit(reload.policies)
        self.errors += [
            f"policy {held['policy']} not programmed: Envoy refused it ({held['reason']}); "
            "fix the policy, and it is tried again"
            for held in self.quarantine.report()
        ]
        enforcement, resources = self._renderer.render(admitted, pods, self.inputs.services())
        snapshot = Snapshot(resources)
        try:
            changed = self.cache.set_snapshot(self.node_id, snapshot)
        except InconsistentSnapshot as exc:
            self.errors.append(f"snapshot refused, last good stays: {exc}")
            log.error("snapshot refused, node keeps its last good config: %s", exc)
            return False
        self._pushed = admitted
        self._render_ms = (time.perf_counter() - started) * 1000
        self.metrics.render_seconds.observe(self._render_ms / 1000)
        self.cache.status_touched(self.node_id)
        if changed:
            log.info(
                "snapshot for %s rendered in %.1f ms (%d policies)",
                self.node_id,
                self._render_ms,
                len(reload.policies),
            )
        for warning in enforcement.warnings:
            log.warning("%s", warning)
        return changed

    def write_status(self) -> None:
        """Write the push state for `steer status`, only when it changed."""
        status = self.cache.status(self.node_id)
        snapshot = self.cache.get(self.node_id)
        document = {
            "node": self.node_id,
            "acked": dict(status.acked),
            "sent": dict(status.sent),
            # The node's current snapshot: Envoy runs it once `acked` has these versions.
            "current": {
                type_url: snapshot.version(type_url)
                for type_url, resources in snapshot.resources.items()
                if resources
            }
            if snapshot is not None
            else {},
            "pushes": status.pushes,
            "acks": status.acks,
            "nacks": status.nacks,
            "streams": status.streams,
            "last_nack": None
            if status.last_nack is None
            else {"type": status.last_nack.type_url, "detail": status.last_nack.detail},
            "errors": self.errors,
            "policy_digest": self.inputs.policies.digest(),
            "loaded_at": self._loaded_at,
            # The last reload's load, render and snapshot, for the churn benchmark.
            "render_ms": self._render_ms,
            "gc": self._gc.status(),
            "loop_errors": self.loop_errors,
            "quarantined": self.quarantine.report(),
        }
        if document == self._last_status:
            return
        self._last_status = document
        write_json_atomic(self.status_file, document)

    async def run(self, xds_socket: Path = XDS_SOCKET) -> None:
        self._survive("initial render", self.refresh)
        server = await serve(self.cache, uds_path=xds_socket)
        stop_metrics = serve_control_metrics(self.metrics)
        try:
            await asyncio.gather(
                self._watch_inputs(), self._report_status(), self._hold_back_refused()
            )
        finally:
            if stop_metrics is not None:
                stop_metrics()
            await server.stop(grace=1)

    def _survive(self, what: str, step: Callable[[], object]) -> None:
        """Run one step of the loop; an exception is logged with its traceback and counted,
        and the loop goes on with the next change: one bad input, or a bug it hits, must
        never stop enforcement (Envoy keeps the last snapshot it was sent)."""
        try:
            step()
        except Exception as exc:
            self.loop_errors += 1
            # The same failure again (a status write every 100 ms on a full disk) is counted
            # but not logged in full each time.
            again = self._last_loop_error == (what, repr(exc))
            self._last_loop_error = (what, repr(exc))
            (log.debug if again else log.exception)(
                "%s failed (%d so far); waiting for the next change", what, self.loop_errors
            )
        else:
            self._last_loop_error = None

    async def _watch_inputs(self) -> None:
        while True:
            try:
                async for due in self.inputs.awatch():
                    if due:
                        self._survive("render after a change", self.refresh)
                return
            except Exception:  # the watch itself failed (a watched directory went away)
                self.loop_errors += 1
                log.exception("watching the inputs failed; watching again in 1 s")
            await asyncio.sleep(1.0)
            self._survive("render after the watch restarted", self.refresh)

    async def _hold_back_refused(self) -> None:
        """After each snapshot: once the node accepts it, note what it holds (and try a
        held suspect again); if it refuses it, hold back the policies that changed since
        the last accepted one and push everything else again (steer.control.quarantine)."""
        while True:
            generation = self.cache.generation(self.node_id)
            try:
                await self.cache.wait_for_ack(self.node_id)
                if self.cache.generation(self.node_id) == generation and (
                    self.quarantine.accepted(self._pushed)
                ):
                    # A suspect renders to the same snapshot when it selects nothing here:
                    # then the ACK is already in, and the next suspect goes at once.
                    self._survive("render with a held policy tried again", self.refresh)
                    continue
            except PushRejected as exc:
                held = self.quarantine.refused(self._pushed, exc.nack.detail)
                if held:
                    log.error(
                        "Envoy refused %s; holding back %s and pushing everything else",
                        exc.nack.type_url.rsplit(".", 1)[-1],
                        ", ".join(held),
                    )
                    self._survive("render without the refused policies", self.refresh)
                else:
                    log.error("Envoy refused a snapshot no policy change explains: %s", exc)
            await self.cache.wait_for_change(self.node_id, generation)

    async def _report_status(self) -> None:
        """Write the status as soon as it changes: `steer status`, `steer lab` and the
        benchmarks wait on it, and a fixed 100 ms period added 50 ms to every change's
        measured enforcement on average."""
        while True:
            self._survive("status write", self.write_status)
            self._gc.tick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_IDLE_S):
                    await self.cache.wait_for_status_change(self.node_id)
