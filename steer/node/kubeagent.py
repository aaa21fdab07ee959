"""The node agent against a Kubernetes API server.

It watches the pods of its own node (field selector spec.nodeName), and, to resolve pod
selectors that name pods elsewhere, every pod's address and labels, as NetworkPolicy
implementations do. Each local pod's cgroup and network namespace are found from its UID
and container IDs (steer.node.cgroups). Once a pod's steering is installed and the node's
Envoy holds the route configuration for it, the agent sets the pod's readiness gate
condition `steer.dev/steered`, so the pod takes no traffic before its policy is in force.
Failures become Events on the pod. After each sync it writes the status `steer status`
reads (the local agent's document, plus the node's name and each pod's readiness gate),
in the /run/steer the agent and Envoy containers share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

from steer.constants import (
    AGENT_STATUS_FILE,
    API_GROUP,
    API_VERSION,
    ENVOY_ADMIN_SOCKET,
    FIELD_MANAGER,
    POLICY_PLURAL,
    READINESS_GATE,
)
from steer.idlegc import IdleCollector
from steer.metrics import AgentMetrics
from steer.model.pod import Pod
from steer.model.service import Problem, ServiceProblem, frontends
from steer.node.agent import (
    StatusWriter,
    map_full_problems,
    observe_view,
    observing,
    service_status,
    status_document,
)
from steer.node.cgroups import (
    MAX_POD_CGROUP_LEVEL,
    PROC,
    ResolveError,
    cgroup_level,
    pod_cgroup,
    pod_netns,
)
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.envoy import admin_get
from steer.node.netns import run_in_netns
from steer.node.observe import Observability
from steer.render.xds import route_name
from steer.source.kube import Reflector, api_list, api_watch
from steer.source.kubeobjects import (
    PolicyValidator,
    gate_is_true,
    has_readiness_gate,
    pod_from_object,
    pods_from_objects,
)
from steer.source.kubeservices import (
    ENDPOINT_SLICES,
    RELEVANT,
    serves_endpoint_slices,
    service_sources,
    services_of,
)

log = logging.getLogger("steer.agent")
T = TypeVar("T")


def envoy_route_names(admin: str = str(ENVOY_ADMIN_SOCKET)) -> set[str]:
    """The route configurations the node's Envoy has accepted and serves. `admin`: its
    admin's Unix socket, or host:port for an admin on TCP."""
    status, body = admin_get("/config_dump?resource=dynamic_route_configs", admin)
    if status != 200:
        raise OSError(f"Envoy admin answered {status} to config_dump: {body[:200]}")
    dump = json.loads(body)
    names = set()
    for config in dump.get("configs", []):
        route = config.get("route_config", {})
        if route.get("name"):
            names.add(str(route["name"]))
    return names


@dataclass
class KubeAgent:
    api_client: Any
    node_name: str
    cgroup_root: Path
    datapath: NodeDatapath
    envoy_cgroup: str = ""
    envoy_admin: str = str(ENVOY_ADMIN_SOCKET)
    # Where the datapath and Envoy live when that is not the agent's own namespace (the
    # lab's node): kernel calls and Envoy's admin go there, API calls stay here.
    datapath_netns: str = ""
    status_file: Path = AGENT_STATUS_FILE
    # The process table pods' network namespaces are found through (hostPID: the node's).
    proc: Path = PROC
    # Syncs the run loop survived (logged with their traceback), for `steer status`.
    loop_errors: int = 0
    reflectors: dict[str, Reflector] = field(default_factory=dict)
    _events_sent: set[tuple[str, str]] = field(default_factory=set)
    _gates_pending: bool = False
    _policies: PolicyValidator = field(default_factory=PolicyValidator)
    _gc: IdleCollector = field(default_factory=IdleCollector)
    _status: StatusWriter | None = None
    # Envoy's access log stream and `steer observe`'s socket, from `run`.
    observability: Observability | None = None
    metrics: AgentMetrics = field(default_factory=AgentMetrics)

    def __post_init__(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)
        self._core = core
        on_node = {"field_selector": f"spec.nodeName={self.node_name}"}
        policies = {"group": API_GROUP, "version": API_VERSION, "plural": POLICY_PLURAL}
        sources: dict[str, tuple[Any, dict[str, Any]]] = {
            "local-pods": (core.list_pod_for_all_namespaces, on_node),
            "pods": (core.list_pod_for_all_namespaces, {}),
            "namespaces": (core.list_namespace, {}),
            "httppolicies": (custom.list_cluster_custom_object, policies),
            # The nodes' podCIDRs: flows to pod addresses skip kube-proxy's chains.
            "nodes": (core.list_node, {}),
            # Services and their endpoints: what connect4 balances over, and the
            # frontends iptables must decide after kube-proxy (docs/architecture.md).
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

    # --- one pass ----------------------------------------------------------------------

    def _is_local(self, pod: Pod) -> bool:
        return pod.node == self.node_name

    def _local_pod(self, obj: Mapping[str, Any], pod: Pod) -> Pod:
        """The pod with its cgroup and netns; without them it stays on iptables. Whatever
        stops one pod's resolution (a pod object the resolver cannot read, a /proc or
        cgroup file the agent may not open) is that pod's problem, reported on the pod:
        the node's other pods are still synced."""
        try:
            cgroup = pod_cgroup(obj, self.cgroup_root)
            netns = None
            if cgroup is not None:
                netns = pod_netns(obj, self.cgroup_root, self.proc, pod_dir=cgroup)
                level = cgroup_level(cgroup)
                if level > MAX_POD_CGROUP_LEVEL:
                    self._event(
                        obj,
                        "SteeringCgroupUnknown",
                        f"pod {pod.key}: cgroup {cgroup} is {level} levels deep, deeper than "
                        f"the {MAX_POD_CGROUP_LEVEL} the eBPF datapath looks through; "
                        "steered by iptables",
                    )
                    cgroup = None
        except ResolveError as exc:
            self._event(obj, "SteeringCgroupUnknown", str(exc))
            return pod
        except OSError as exc:
            message = f"pod {pod.key}: its cgroup or network namespace cannot be read: {exc}"
            self._event(obj, "SteeringCgroupUnknown", message)
            return pod
        return replace(pod, cgroup=str(cgroup or ""), netns=netns or "")

    def sync(self) -> SyncReport:
        loaded_at = time.time()
        objects = {kind: r.snapshot() for kind, r in self.reflectors.items()}
        local_objects = {
            f"{o['metadata']['namespace']}/{o['metadata']['name']}": o
            for o in objects["local-pods"]
        }
        pods = [
            self._local_pod(local_objects[p.key], p) if p.key in local_objects else p
            for p in pods_from_objects(objects["pods"], objects["namespaces"])
        ]
        policy_objects = self._policies.validate(objects["httppolicies"])
        policies = [p.policy for p in policy_objects if p.policy is not None]
        parsed = services_of(objects)
        found, problems = frontends(parsed.services, node_ips=[IPv4Address(self.datapath.envoy_ip)])
        report = self._in_datapath_netns(
            lambda: self.datapath.sync(
                policies,
                pods,
                self.envoy_cgroup,
                local=self._is_local,
                services=found,
                pod_cidrs=pod_cidrs(objects.get("nodes", [])),
            )
        )
        observe_view(self.observability, pods, report, self.datapath)
        self.metrics.observe_sync(time.time() - loaded_at, report.revoked, len(report.errors))
        problems = problems + map_full_problems(found, report.service_fallbacks)
        self._report_service_problems(objects.get("services", []), parsed.errors, problems)
        for error in report.errors:
            log.error("%s", error)
        self._report_pod_problems(local_objects, report)
        gates = self._open_readiness_gates(local_objects, report)
        # As the local agent does: refused policies are listed with the sync's errors (the
        # control plane also reports them on the policy's Accepted condition).
        refused = [str(e) for p in policy_objects for e in p.errors]
        shown = replace(report, errors=refused + report.errors) if refused else report
        self._write_status(
            [p for p in pods if p.key in local_objects],
            shown,
            gates,
            loaded_at,
            service_status(
                parsed.services,
                found,
                problems,
                report.service_fallbacks,
                report.service_listeners,
            ),
        )
        return report

    def _report_service_problems(
        self,
        objects: list[dict[str, Any]],
        errors: list[str],
        problems: list[ServiceProblem],
    ) -> None:
        """Each problem once, as a Warning Event on its Service; unreadable parts logged."""
        for error in errors:
            if ("", error) not in self._events_sent:
                self._events_sent.add(("", error))
                log.warning("%s", error)
        metas = [(o.get("metadata") or {}, o) for o in objects]
        by_key = {f"{meta.get('namespace')}/{meta.get('name')}": o for meta, o in metas}
        for problem in problems:
            obj = by_key.get(problem.service)
            if obj is not None:
                self._event(
                    obj,
                    problem.problem.value,
                    problem.message,
                    kind="Service",
                    node_scoped=problem.problem is Problem.MAP_FULL,
                )

    def _write_status(
        self,
        local_pods: list[Pod],
        report: SyncReport,
        gates: Mapping[str, str],
        loaded_at: float,
        services: list[dict[str, object]],
    ) -> None:
        if self._status is None or self._status.path != self.status_file:
            self._status = StatusWriter(self.status_file)
        document = status_document(
            local_pods,
            report,
            self.datapath,
            loaded_at=loaded_at,
            loop_errors=self.loop_errors,
            pod_fields={key: {"readiness_gate": state} for key, state in gates.items()},
            mode="kubernetes",
            node=self.node_name,
            gates_waiting=sum(1 for state in gates.values() if state != "True"),
            gc=self._gc.status(),
            services=services,
        )
        try:
            self._status.write(document)
        except OSError as exc:
            # The node's steering is in force already; failing the sync over its report
            # would only retry it every second (readiness gates wait on a failed sync).
            log.warning("status for steer status not written to %s: %s", self.status_file, exc)

    def _report_pod_problems(
        self, local_objects: Mapping[str, Mapping[str, Any]], report: SyncReport
    ) -> None:
        for warning in report.warnings:
            key = warning.removeprefix("pod ").split(":", 1)[0]
            if key in local_objects:
                self._event(local_objects[key], "SteeringAnnotationIgnored", warning)

    def _open_readiness_gates(
        self, local_objects: Mapping[str, Mapping[str, Any]], report: SyncReport
    ) -> dict[str, str]:
        """Set the gate of every pod whose steering is in force; returns the gate of each
        local pod that has one: "True", or "waiting: " and what for (for `steer status`)."""
        gates: dict[str, str] = {}
        waiting = {}
        for key, obj in local_objects.items():
            if not has_readiness_gate(obj):
                continue
            if gate_is_true(obj):
                gates[key] = "True"
            elif key not in report.dataplanes:
                gates[key] = "waiting: this agent does not steer the pod"
            else:
                waiting[key] = obj
        self._gates_pending = bool(waiting)
        if not waiting:
            return gates
        try:
            served = self._in_datapath_netns(lambda: envoy_route_names(self.envoy_admin))
        except OSError as exc:
            log.info("Envoy admin not reachable yet (%s); readiness gates wait", exc)
            gates.update(dict.fromkeys(waiting, f"waiting: Envoy's admin is not reachable: {exc}"))
            return gates
        for key, obj in waiting.items():
            pod = pod_from_object(obj, {})
            if pod is None or route_name(IPv4Network(f"{pod.ip}/32")) not in served:
                gates[key] = "waiting: Envoy does not serve the pod's routes yet"
                continue
            set_now = self._set_gate(obj, report.dataplanes[key])
            gates[key] = "True" if set_now else "waiting: setting the condition failed"
        return gates

    def _set_gate(self, obj: Mapping[str, Any], dataplane: tuple[str, str]) -> bool:
        meta = obj["metadata"]
        condition = {
            "type": READINESS_GATE,
            "status": "True",
            "reason": "Steered",
            "message": f"steered by {dataplane[0]} ({dataplane[1]}); Envoy has the pod's routes",
            "lastTransitionTime": _now(),
        }
        try:
            self._core.patch_namespaced_pod_status(
                meta["name"],
                meta["namespace"],
                {"status": {"conditions": [condition]}},
                field_manager=FIELD_MANAGER,
            )
            log.info(
                "pod %s/%s: readiness gate %s set", meta["namespace"], meta["name"], READINESS_GATE
            )
        except Exception as exc:  # the pod went away meanwhile, or the API is away
            log.warning("readiness gate of %s/%s not set: %s", meta["namespace"], meta["name"], exc)
            return False
        return True

    def _event(
        self,
        obj: Mapping[str, Any],
        reason: str,
        message: str,
        *,
        kind: str = "Pod",
        node_scoped: bool = True,
    ) -> None:
        """A Warning Event on `obj`. One that is not `node_scoped` states a fact about the
        object that every node's agent finds alike (a Service with no ready endpoints):
        it is named after the fact, so the first agent's create wins and the others' are
        refused as duplicates, instead of one Event per node."""
        meta = obj["metadata"]
        seen = (str(meta.get("uid")), message)
        if seen in self._events_sent:
            return
        self._events_sent.add(seen)
        from kubernetes import client

        name = None
        if not node_scoped:
            fact = "\0".join((kind, str(meta.get("uid")), reason, message)).encode()
            name = f"{meta['name']}.steer-{hashlib.sha256(fact).hexdigest()[:16]}"
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                namespace=meta["namespace"],
                name=name,
                generate_name=f"{meta['name']}." if node_scoped else None,
            ),
            involved_object=client.V1ObjectReference(
                api_version="v1",
                kind=kind,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message,
            type="Warning",
            source=client.V1EventSource(
                component="steer-agent", host=self.node_name if node_scoped else None
            ),
            first_timestamp=datetime.now(UTC),
            last_timestamp=datetime.now(UTC),
            count=1,
        )
        try:
            self._core.create_namespaced_event(meta["namespace"], event)
        except client.ApiException as exc:
            if exc.status == 409 and not node_scoped:
                log.debug("event %s: another node's agent reported it", event.metadata.name)
                return
            log.warning("event on %s/%s not recorded: %s", meta["namespace"], meta["name"], exc)
        except Exception as exc:  # events are best effort
            log.warning("event on %s/%s not recorded: %s", meta["namespace"], meta["name"], exc)

    def _in_datapath_netns(self, action: Callable[[], T]) -> T:
        return run_in_netns(self.datapath_netns, action) if self.datapath_netns else action()

    # --- loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        changed = threading.Event()
        if ENDPOINT_SLICES in self.reflectors and not serves_endpoint_slices(self.api_client):
            del self.reflectors[ENDPOINT_SLICES]
        for reflector in self.reflectors.values():
            reflector.on_change = changed.set
            reflector.start(stop)
        with observing(
            self.metrics, self.datapath, self.envoy_admin, self.datapath_netns
        ) as self.observability:
            self._run(stop, changed)

    def _run(self, stop: threading.Event, changed: threading.Event) -> None:
        while not stop.is_set():
            # Readiness gates also wait on Envoy, which sends no API events: while any
            # pod waits, look again every second even without a change.
            woken = changed.wait(timeout=1.0)
            drifted = self._in_datapath_netns(self.datapath.drifted)
            if not (woken or drifted or self._gates_pending):
                self._gc.tick()
                continue
            time.sleep(0.02)  # one sync for a burst of events
            changed.clear()
            if not all(r.synced.is_set() for r in self.reflectors.values()):
                continue
            with self._gc.change():
                try:
                    self.sync()
                except Exception:  # never die on one bad pass: the next change retries
                    self.loop_errors += 1
                    log.exception("sync failed; retrying on the next change")
                    self._gates_pending = True
            # Between changes, so that churn that never pauses still gets collected.
            self._gc.tick()


def pod_cidrs(nodes: list[dict[str, Any]]) -> list[IPv4Network]:
    """The IPv4 ranges nodes give their pods (spec.podCIDRs, or podCIDR before 1.16); none
    where the CNI allocates addresses itself, and then no flow skips kube-proxy's chains."""
    found = set()
    for node in nodes:
        spec = node.get("spec") or {}
        for cidr in spec.get("podCIDRs") or [spec.get("podCIDR")]:
            try:
                network = ip_network(str(cidr))
            except ValueError:
                continue
            if isinstance(network, IPv4Network):
                found.add(network)
    return sorted(found)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
