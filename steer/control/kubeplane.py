"""The control plane against a Kubernetes API server.

Reflectors keep HTTPPolicies, pods and namespaces in memory; every change re-renders one
snapshot per node (only that node's pods are its destinations, while selectors match pods
anywhere) into the same cache local mode uses, served over ADS on TCP. Each policy's
status is written back: Accepted with the validation message, Programmed once every
connected Envoy has acknowledged it, and PodsProtected, False (with an Event on the policy)
while its podSelector selects pods that steer does not steer, naming them and why.

With several replicas, each renders and serves its own Envoys, and only the holder of the
leader Lease (steer.control.leader) writes status and Events.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

from steer.constants import (
    API_GROUP,
    API_GROUP_VERSION,
    API_VERSION,
    CONDITION_PODS_PROTECTED,
    POLICY_KIND,
    POLICY_PLURAL,
)
from steer.control.cache import InconsistentSnapshot, Snapshot, SnapshotCache
from steer.control.leader import LeaseElector
from steer.control.quarantine import Quarantine
from steer.control.xds import XdsServerTls, serve
from steer.idlegc import IdleCollector
from steer.metrics import ControlMetrics, serve_control_metrics
from steer.model.pod import UNSTEERED_WHY, Pod, Unsteered, steering_of
from steer.model.policy import HTTPPolicy
from steer.model.service import Service
from steer.render.xds import SnapshotRenderer
from steer.source.kube import Reflector, api_list, api_watch
from steer.source.kubeobjects import (
    PolicyObject,
    PolicyValidator,
    _condition,  # one rule for lastTransitionTime across all of a policy's conditions
    host_network_pods,
    pods_from_objects,
    policy_status,
)
from steer.source.kubeservices import (
    ENDPOINT_SLICES,
    RELEVANT,
    serves_endpoint_slices,
    service_sources,
    services_of,
)

log = logging.getLogger("steer.control")
DEBOUNCE_S = 0.02

# --- the PodsProtected condition -------------------------------------------------------

PODS_PROTECTED: Final = CONDITION_PODS_PROTECTED
# Pods named in the condition's message (and the Event); the rest are counted. A status is
# one object in etcd: a selector over thousands of opted-out pods must not bloat it.
UNPROTECTED_LISTED: Final = 10
# How long the control loop waits after a step failed, before the next one.
LOOP_RETRY_S: Final = 1.0


@dataclass(frozen=True)
class Coverage:
    """What a policy's podSelector selects: how many pods, and which are not steered."""

    selected: int
    unprotected: tuple[tuple[str, Unsteered], ...]  # (pod key, why), sorted by key


def policy_coverage(policies: Iterable[HTTPPolicy], pods: Iterable[Pod]) -> dict[str, Coverage]:
    """Each policy's coverage over every pod of the cluster, host-network pods included.

    A policy that selects a pod steer does not steer does not apply to that pod at all (no
    L4 verdict, no HTTP rule), whatever it says; this is how its author finds out. The
    steering is the agent's own (`steering_of`), so the two never disagree.
    """
    by_namespace: dict[str, list[tuple[Pod, dict[str, str], Unsteered | None]]] = {}
    for pod in pods:
        steering, _ = steering_of(pod)
        why = None if steering.inject else (steering.unsteered or Unsteered.NOT_OPTED_IN)
        by_namespace.setdefault(pod.namespace, []).append((pod, dict(pod.labels), why))
    coverage: dict[str, Coverage] = {}
    for policy in policies:
        selector = policy.spec.pod_selector
        selected = [
            (pod, why)
            for pod, labels, why in by_namespace.get(policy.metadata.namespace, [])
            if selector.matches(labels)
        ]
        unprotected = sorted((pod.key, why) for pod, why in selected if why is not None)
        coverage[policy.key] = Coverage(len(selected), tuple(unprotected))
    return coverage


def pods_protected_condition(
    coverage: Coverage, generation: int, previous: Iterable[Mapping[str, Any]], now: str
) -> dict[str, Any]:
    """True while every selected pod is steered. False names the unsteered ones (at most
    UNPROTECTED_LISTED) and why; its reason is that why (HostNetwork, OptedOut,
    NotOptedIn) when all share it, else SeveralReasons."""
    if not coverage.unprotected:
        ok, reason = True, "AllSteered" if coverage.selected else "NoPodsSelected"
        message = (
            f"all {coverage.selected} selected pods are steered"
            if coverage.selected
            else "the podSelector selects no pod"
        )
    else:
        ok = False
        reasons = {why for _, why in coverage.unprotected}
        reason = next(iter(reasons)).value if len(reasons) == 1 else "SeveralReasons"
        listed = coverage.unprotected[:UNPROTECTED_LISTED]
        more = len(coverage.unprotected) - len(listed)
        message = (
            f"{len(coverage.unprotected)} of {coverage.selected} selected pods are not "
            "steered, so this policy is not enforced on them: "
            + "; ".join(f"{key} ({why.value}: {UNSTEERED_WHY[why]})" for key, why in listed)
            + (f"; and {more} more" if more else "")
            + "; fix: see docs/annotations.md#who-is-steered"
        )
    return _condition(
        PODS_PROTECTED,
        ok,
        reason=reason,
        message=message,
        generation=generation,
        previous=previous,
        now=now,
    )


def status_with_coverage(
    status: dict[str, Any],
    coverage: Coverage | None,
    generation: int,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """`policy_status`'s document plus PodsProtected (absent while the spec is invalid:
    an invalid policy selects nothing)."""
    if coverage is None:
        return status
    old = list((previous or {}).get("conditions") or [])
    condition = pods_protected_condition(coverage, generation, old, now)
    return {**status, "conditions": [*status["conditions"], condition]}


# Condition (type, reason, or None for any) that is False -> the Event reason it raises.
EVENT_REASONS: Final = {
    (PODS_PROTECTED, None): "PodsUnprotected",
    ("Programmed", "RefusedByEnvoy"): "RefusedByEnvoy",
}


def policy_event(
    policy: Mapping[str, Any], condition: Mapping[str, Any], now: datetime
) -> dict[str, Any] | None:
    """The Warning Event (core/v1) on the policy object for a False condition that users
    must hear of (EVENT_REASONS), or None."""
    if condition.get("status") != "False":
        return None
    kind, why = str(condition.get("type")), str(condition.get("reason"))
    reason = EVENT_REASONS.get((kind, None)) or EVENT_REASONS.get((kind, why))
    if reason is None:
        return None
    meta = policy.get("metadata", {})
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": API_GROUP_VERSION,
            "kind": POLICY_KIND,
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": condition["message"],
        "type": "Warning",
        "source": {"component": "steer-control"},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def render_node_snapshots(
    policies: list[HTTPPolicy],
    pods: list[Pod],
    nodes: set[str],
    renderers: dict[str, SnapshotRenderer] | None = None,
    services: Sequence[Service] = (),
) -> dict[str, Snapshot]:
    """One snapshot per node: its own pods are destinations, every pod can be a peer.
    `renderers` (per node) lets a re-render reuse what did not change."""
    renderers = renderers if renderers is not None else {}

    def on(node: str) -> Callable[[Pod], bool]:
        return lambda pod: pod.node == node

    return {
        node: Snapshot(
            renderers.setdefault(node, SnapshotRenderer(on(node))).render(policies, pods, services)[
                1
            ]
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
    # For PodsProtected: every pod of the last refresh, host-network pods included; the
    # coverage computed from it (and the policies it was computed for); the message of
    # the last PodsUnprotected Event per policy, so that one is sent per change.
    _status_pods: Sequence[Pod] = ()
    _coverage: tuple[object, object, dict[str, Coverage]] = (None, None, {})
    _events_sent: dict[tuple[str, str], str] = field(default_factory=dict)
    quarantine: Quarantine = field(default_factory=Quarantine)
    # The policies the current snapshots were rendered from; the NACK last acted on; the
    # snapshot generations the nodes last accepted as a whole.
    _pushed: list[HTTPPolicy] = field(default_factory=list)
    _handled_nack: object = None
    _accepted_at: tuple[int, ...] = ()
    # Loop steps that failed and were survived (logged with their traceback).
    loop_errors: int = 0
    # With several replicas, only the holder of this Lease writes status and Events; every
    # replica still renders, quarantines for its own Envoys and serves xDS and webhooks.
    # None: the only replica, which always writes.
    leader: LeaseElector | None = None
    # Status patches and Events this replica wrote (tests see who the writer was).
    status_writes: int = 0
    events_written: int = 0

    def __post_init__(self) -> None:
        from kubernetes import client

        self.metrics = ControlMetrics(self.cache)
        core = client.CoreV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)
        self._custom = custom
        policy_args = {"group": API_GROUP, "version": API_VERSION, "plural": POLICY_PLURAL}
        sources: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
            "pods": (core.list_pod_for_all_namespaces, {}),
            "namespaces": (core.list_namespace, {}),
            "httppolicies": (custom.list_cluster_custom_object, policy_args),
            # Which Service a flow was dialled to reaches Envoy through a listener per
            # Service port (steer.model.servicepolicy): the agents compute the same ports.
            **service_sources(self.api_client),
        }
        self.reflectors = {
            kind: Reflector(
                kind,
                api_list(call, **kwargs),
                api_watch(call, **kwargs),
                relevant=RELEVANT.get(kind),
            )
            for kind, (call, kwargs) in sources.items()
        }

    def refresh(self) -> bool:
        """Re-render every node's snapshot; True if any changed."""
        objects = {kind: r.snapshot() for kind, r in self.reflectors.items()}
        pods = pods_from_objects(objects["pods"], objects["namespaces"])
        self._status_pods = pods + host_network_pods(objects["pods"], objects["namespaces"])
        self.policy_objects = self._validator.validate(objects["httppolicies"])
        for item in self.policy_objects:
            for error in item.errors:
                log.warning("policy not applied: %s", error)
        policies = self.quarantine.admit(
            p.policy for p in self.policy_objects if p.policy is not None
        )
        self._pushed = policies
        nodes = {p.node for p in pods if p.node} | set(self.cache.nodes())
        self._rendered_nodes = nodes
        changed = False
        for gone in set(self._renderers) - nodes:
            del self._renderers[gone]
        parsed = services_of(objects)
        started = time.perf_counter()
        rendered = render_node_snapshots(policies, pods, nodes, self._renderers, parsed.services)
        self.metrics.render_seconds.observe(time.perf_counter() - started)
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

    def check_pushes(self) -> bool:
        """Act on what the nodes made of the current snapshots: a refusal holds back the
        policies that changed since they last accepted everything, an acceptance may try a
        held suspect again (steer.control.quarantine). True if a render is due."""
        for node in self.cache.nodes():
            snapshot, status = self.cache.get(node), self.cache.status(node)
            nack = status.last_nack
            if snapshot is None or nack is None or nack.version != snapshot.version(nack.type_url):
                continue
            if (node, nack) == self._handled_nack:
                continue
            self._handled_nack = (node, nack)
            held = self.quarantine.refused(self._pushed, nack.detail)
            if held:
                log.error(
                    "node %s refused %s; holding back %s and pushing everything else",
                    node,
                    nack.type_url.rsplit(".", 1)[-1],
                    ", ".join(held),
                )
                return True
            log.error("node %s refused a snapshot no policy change explains: %s", node, nack)
        acked, connected = self.acked_nodes()
        generations = tuple(self.cache.generation(n) for n in sorted(acked))
        if connected and len(acked) == connected and generations != self._accepted_at:
            self._accepted_at = generations
            return self.quarantine.accepted(self._pushed)
        return False

    def coverage(self) -> dict[str, Coverage]:
        """policy_coverage of the last refresh, computed again only after a refresh."""
        items, pods, cached = self._coverage
        if items is not self.policy_objects or pods is not self._status_pods:
            policies = [p.policy for p in self.policy_objects if p.policy is not None]
            cached = policy_coverage(policies, self._status_pods)
            self._coverage = (self.policy_objects, self._status_pods, cached)
        return cached

    def writes(self) -> bool:
        """Whether this replica may write status and Events right now: asked again before
        every write, so a replica that lost the Lease stops mid-way."""
        return self.leader is None or self.leader.is_leader()

    def write_statuses(self) -> None:
        if not self.writes():
            return
        acked, connected = self.acked_nodes()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        existing = {
            f"{o['metadata'].get('namespace')}/{o['metadata']['name']}": o
            for o in self.reflectors["httppolicies"].snapshot()
        }
        coverage = self.coverage()
        refused = {held["policy"]: held["reason"] for held in self.quarantine.report()}
        for item in self.policy_objects:
            current = existing.get(item.key, {}).get("status")
            wanted = policy_status(
                item, current, acked, connected, now, refused=refused.get(item.key)
            )
            wanted = status_with_coverage(
                wanted, coverage.get(item.key), item.generation, current, now
            )
            self._raise_events(existing.get(item.key, {}), item.key, wanted)
            if _same_status(current, wanted):
                continue
            namespace, name = item.key.split("/", 1)
            if not self.writes():
                return
            try:
                self._custom.patch_namespaced_custom_object_status(
                    API_GROUP, API_VERSION, namespace, POLICY_PLURAL, name, {"status": wanted}
                )
                self.status_writes += 1
            except Exception as exc:  # deleted meanwhile, or the API server is away
                log.warning("status of %s not written: %s", item.key, exc)

    def _raise_events(self, policy: Mapping[str, Any], key: str, status: Mapping[str, Any]) -> None:
        """A log line and an Event on the policy each time a condition users must hear of
        (unsteered pods, a refusal by Envoy) changes its message."""
        for condition in status.get("conditions", []):
            sent = (key, str(condition.get("type")))
            event = policy_event(policy, condition, datetime.now(UTC)) if policy else None
            if event is None:
                self._events_sent.pop(sent, None)
                continue
            if self._events_sent.get(sent) == event["message"]:
                continue
            if not self.writes():
                return
            self._events_sent[sent] = event["message"]
            log.warning("policy %s: %s", key, event["message"])
            from kubernetes import client

            try:
                # The client serialises a dict body as is (camelCase keys, as the API has).
                client.CoreV1Api(self.api_client).create_namespaced_event(
                    event["metadata"]["namespace"], cast(Any, event)
                )
                self.events_written += 1
            except Exception as exc:  # events are best effort
                log.warning("event on policy %s not recorded: %s", key, exc)

    async def _loop(self, dirty: asyncio.Event) -> None:
        while True:
            try:
                await self._step(dirty)
            except Exception:
                # One bad object or a bug it hits must never stop the control plane:
                # Envoys keep their last snapshot, and the next change tries again.
                self.loop_errors += 1
                log.exception("control loop step failed (%d so far)", self.loop_errors)
                await asyncio.sleep(LOOP_RETRY_S)

    async def _step(self, dirty: asyncio.Event) -> None:
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
        # Every step, changed or not: under churn there is never a quiet second.
        self._gc.tick()
        if self.check_pushes():
            self.refresh()
        # ACKs arrive on the xDS streams, not as API events: re-check statuses.
        await asyncio.to_thread(self.write_statuses)

    async def run(
        self,
        xds_port: int | None,
        xds_socket: Path | None = None,
        webhook: Callable[[], Awaitable[Any]] | None = None,
        *,
        xds_tls: XdsServerTls | None = None,
    ) -> None:
        """Serve ADS on TCP (and/or a Unix socket) until cancelled; `webhook` starts the
        admission server on this loop. With `xds_tls`, TCP is mutual TLS and each Envoy
        gets only the snapshot of the node its certificate names."""
        loop = asyncio.get_running_loop()
        dirty = asyncio.Event()
        stop = threading.Event()

        def changed() -> None:
            loop.call_soon_threadsafe(dirty.set)

        if ENDPOINT_SLICES in self.reflectors and not await asyncio.to_thread(
            serves_endpoint_slices, self.api_client
        ):
            del self.reflectors[ENDPOINT_SLICES]
        for reflector in self.reflectors.values():
            reflector.on_change = changed
            reflector.start(stop)
        election = None
        if self.leader is not None:
            # The election blocks on API calls and sleeps: a thread of its own, never this
            # loop, which serves xDS and the webhooks.
            election = threading.Thread(
                target=self.leader.run, args=(stop,), name="steer-leader", daemon=True
            )
            election.start()
        server = await serve(self.cache, uds_path=xds_socket, tcp_port=xds_port, tls=xds_tls)
        stop_metrics = serve_control_metrics(self.metrics)
        if webhook is not None:
            await webhook()
        try:
            await self._loop(dirty)
        finally:
            if stop_metrics is not None:
                stop_metrics()
            stop.set()
            if election is not None and self.leader is not None:
                # Let it release the Lease (release_on_stop) so another replica takes over
                # now rather than once the Lease expires.
                await asyncio.to_thread(election.join, self.leader.timings.renew_deadline)
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
