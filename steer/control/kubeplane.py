"""The control plane against a Kubernetes API server.

Reflectors keep HTTPPolicies, pods and namespaces in memory; every change re-renders one
snapshot per node (only that node's pods are its destinations, while selectors match pods
anywhere) into the same cache local mode uses, served over ADS on TCP. Each policy's
status is written back: Accepted with the validation message, Programmed once every
connected Envoy has acknowledged it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from steer.constants import API_GROUP, API_VERSION, POLICY_PLURAL
from steer.control.cache import InconsistentSnapshot, Snapshot, SnapshotCache
from steer.control.xds import serve
from steer.idlegc import IdleCollector
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.render.xds import SnapshotRenderer
from steer.source.kube import Reflector, api_list, api_watch
from steer.source.kubeobjects import (
    PolicyObject,
    PolicyValidator,
    pods_from_objects,
    policy_status,
)

log = logging.getLogger("steer.control")
DEBOUNCE_S = 0.02


def render_node_snapshots(
    policies: list[HTTPPolicy],
    pods: list[Pod],
    nodes: set[str],
    renderers: dict[str, SnapshotRenderer] | None = None,
) -> dict[str, Snapshot]:
    """One snapshot per node: its own pods are destinations, every pod can be a peer.
    `renderers` (per node) lets a re-render reuse what did not change."""
    renderers = renderers if renderers is not None else {}

    def on(node: str) -> Callable[[Pod], bool]:
        return lambda pod: pod.node == node

    return {
        node: Snapshot(
            renderers.setdefault(node, SnapshotRenderer(on(node))).render(policies, pods)[1]
        )
        for node in sorted(nodes)
    }


@dataclass
class KubeControlPlane:
    api_client: Any
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    reflectors: dict[str, Reflector] = field(default_factory=dict)
    policy_objects: list[PolicyObject] = field(default_factory=list)
    _rendered_nodes: set[str] = field(default_factory=set)
    _renderers: dict[str, SnapshotRenderer] = field(default_factory=dict)
    _validator: PolicyValidator = field(default_factory=PolicyValidator)
    _gc: IdleCollector = field(default_factory=IdleCollector)

    def __post_init__(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)
        self._custom = custom
        policy_args = {"group": API_GROUP, "version": API_VERSION, "plural": POLICY_PLURAL}
        sources: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
            "pods": (core.list_pod_for_all_namespaces, {}),
            "namespaces": (core.list_namespace, {}),
            "httppolicies": (custom.list_cluster_custom_object, policy_args),
        }
        self.reflectors = {
            kind: Reflector(kind, api_list(call, **kwargs), api_watch(call, **kwargs))
            for kind, (call, kwargs) in sources.items()
        }

    def refresh(self) -> bool:
        """Re-render every node's snapshot; True if any changed."""
        objects = {kind: r.snapshot() for kind, r in self.reflectors.items()}
        pods = pods_from_objects(objects["pods"], objects["namespaces"])
        self.policy_objects = self._validator.validate(objects["httppolicies"])
        for item in self.policy_objects:
            for error in item.errors:
                log.warning("policy not applied: %s", error)
        policies = [p.policy for p in self.policy_objects if p.policy is not None]
        nodes = {p.node for p in pods if p.node} | set(self.cache.nodes())
        self._rendered_nodes = nodes
        changed = False
        for gone in set(self._renderers) - nodes:
            del self._renderers[gone]
        rendered = render_node_snapshots(policies, pods, nodes, self._renderers)
        for node, snapshot in rendered.items():
            try:
                changed |= self.cache.set_snapshot(node, snapshot)
            except InconsistentSnapshot as exc:
                log.error("snapshot for %s refused, it keeps its last good one: %s", node, exc)
        return changed

    def acked_nodes(self) -> tuple[dict[str, str], int]:
        """Nodes whose Envoy acknowledged everything sent, and how many are connected."""
        acked: dict[str, str] = {}
        connected = 0
        for node in self.cache.nodes():
            status = self.cache.status(node)
            if status.streams == 0:
                continue
            connected += 1
            snapshot = self.cache.get(node)
            if snapshot is None:
                continue
            current = {t: snapshot.version(t) for t, items in snapshot.resources.items() if items}
            if all(status.acked.get(t) == v for t, v in current.items()):
                acked[node] = ",".join(f"{v}" for _, v in sorted(current.items()))
        return acked, connected

    def write_statuses(self) -> None:
        acked, connected = self.acked_nodes()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        existing = {
            f"{o['metadata'].get('namespace')}/{o['metadata']['name']}": o
            for o in self.reflectors["httppolicies"].snapshot()
        }
        for item in self.policy_objects:
            current = existing.get(item.key, {}).get("status")
            wanted = policy_status(item, current, acked, connected, now)
            if _same_status(current, wanted):
                continue
            namespace, name = item.key.split("/", 1)
            try:
                self._custom.patch_namespaced_custom_object_status(
                    API_GROUP, API_VERSION, namespace, POLICY_PLURAL, name, {"status": wanted}
                )
            except Exception as exc:  # deleted meanwhile, or the API server is away
                log.warning("status of %s not written: %s", item.key, exc)

    async def run(
        self,
        xds_port: int | None,
        xds_socket: Path | None = None,
        webhook: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Serve ADS on TCP (and/or a Unix socket) until cancelled; `webhook` starts the
        admission server on this loop."""
        loop = asyncio.get_running_loop()
        dirty = asyncio.Event()
        stop = threading.Event()

        def changed() -> None:
            loop.call_soon_threadsafe(dirty.set)

        for reflector in self.reflectors.values():
            reflector.on_change = changed
            reflector.start(stop)
        server = await serve(self.cache, uds_path=xds_socket, tcp_port=xds_port)
        if webhook is not None:
            await webhook()
        try:
            while True:
                try:
                    await asyncio.wait_for(dirty.wait(), timeout=1.0)
                    await asyncio.sleep(DEBOUNCE_S)  # one render for a burst of events
                    dirty.clear()
                    if all(r.synced.is_set() for r in self.reflectors.values()):
                        with self._gc.change():
                            self.refresh()
                except TimeoutError:
                    # A newly connected Envoy needs a snapshot even if no object changed.
                    if set(self.cache.nodes()) - self._rendered_nodes:
                        self.refresh()
                    self._gc.tick()
                # ACKs arrive on the xDS streams, not as API events: re-check statuses.
                await asyncio.to_thread(self.write_statuses)
        finally:
            stop.set()
            await server.stop(grace=1)


def _same_status(current: Any, wanted: dict[str, Any]) -> bool:
    if not isinstance(current, dict):
        return False

    def strip(status: dict[str, Any]) -> Any:
        return {
            **status,
            "conditions": [
                {k: v for k, v in c.items() if k != "lastTransitionTime"}
                for c in status.get("conditions", [])
            ],
        }

    return bool(strip(current) == strip(wanted))
