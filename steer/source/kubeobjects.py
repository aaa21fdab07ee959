"""API objects (raw JSON, as the API server sends them) to steer's model. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from steer.constants import READINESS_GATE
from steer.model.load import PolicyError, validate_policy
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy

Object = Mapping[str, Any]
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


def namespace_labels(namespaces: Iterable[Object]) -> dict[str, dict[str, str]]:
    return {
        str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {}) for ns in namespaces
    }


def pod_from_object(
    obj: Object,
    labels_of_namespace: Mapping[str, Mapping[str, str]],
    *,
    host_network: bool = False,
) -> Pod | None:
    """The pod as steer sees it, or None where there is nothing to steer: no IPv4 address
    yet, finished, being deleted, or on the host's network.

    `host_network`: return a host-network pod too, marked `host_network=True` (its address
    is the node's, or "" if it has none yet). Only the policy status wants those, to name
    the selected pods steer cannot protect; the resolver must never see them, or a pod
    selector would match the node's own address."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    on_host = bool(spec.get("hostNetwork"))
    if (on_host and not host_network) or status.get("phase") in FINISHED_PHASES:
        return None
    if meta.get("deletionTimestamp"):
        return None
    try:
        ip = str(IPv4Address(status.get("podIP", "")))
    except ValueError:
        if not on_host:
            return None
        ip = ""
    namespace = str(meta.get("namespace", "default"))
    return Pod(
        name=str(meta["name"]),
        namespace=namespace,
        ip=ip,
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        namespace_labels=dict(labels_of_namespace.get(namespace, {})),
        node=str(spec.get("nodeName", "")),
        inject_default=False,  # opt-in, as the admission webhook decides it
        host_network=on_host,
    )


def pods_from_objects(objects: Iterable[Object], namespaces: Iterable[Object]) -> list[Pod]:
    labels = namespace_labels(namespaces)
    return [p for p in (pod_from_object(o, labels) for o in objects) if p is not None]


def host_network_pods(objects: Iterable[Object], namespaces: Iterable[Object]) -> list[Pod]:
    """The live host-network pods, which `pods_from_objects` leaves out: for the policy
    status only (see `pod_from_object`)."""
    labels = namespace_labels(namespaces)
    pods = (pod_from_object(o, labels, host_network=True) for o in objects)
    return [p for p in pods if p is not None and p.host_network]


def has_readiness_gate(obj: Object) -> bool:
    gates = obj.get("spec", {}).get("readinessGates") or []
    return any(g.get("conditionType") == READINESS_GATE for g in gates)


def gate_is_true(obj: Object) -> bool:
    conditions = obj.get("status", {}).get("conditions") or []
    return any(c.get("type") == READINESS_GATE and c.get("status") == "True" for c in conditions)


@dataclass(frozen=True)
class PolicyObject:
    key: str
    generation: int
    policy: HTTPPolicy | None
    errors: tuple[PolicyError, ...]


def _metadata(obj: object) -> Mapping[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def _string(value: object, default: str) -> str:
    # Only strings are shown: str() of a hostile value (nested 1,000 deep) would raise.
    return value if isinstance(value, str) else default


def _policy_key(obj: object) -> str:
    meta = _metadata(obj)
    namespace = _string(meta.get("namespace"), "default")
    return f"{namespace}/{_string(meta.get('name'), '(no name)')}"


def _generation(obj: object) -> int:
    generation = _metadata(obj).get("generation", 1)
    return generation if type(generation) is int else 1


def policy_from_object(obj: Object) -> PolicyObject:
    """The object's policy, or its errors. Never raises: an object the model cannot take,
    however it is malformed, is this one object's Accepted=False, never a stop of the
    control plane or agent that read it."""
    key = _policy_key(obj)
    source = f"HTTPPolicy {key}"
    try:
        if not isinstance(obj, Mapping):
            raise TypeError("the object is not a JSON object")
        result = validate_policy(dict(obj), source)
    except Exception as exc:  # validate_policy never raises; this is the last stop
        result = [
            PolicyError(source, "", f"could not be validated ({type(exc).__name__}); fix: check it")
        ]
    if isinstance(result, HTTPPolicy):
        return PolicyObject(key, _generation(obj), result, ())
    return PolicyObject(key, _generation(obj), None, tuple(result))


def _condition(
    kind: str,
    ok: bool,
    *,
    reason: str,
    message: str,
    generation: int,
    previous: Iterable[Object],
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    # lastTransitionTime changes only when the status does, as API conventions ask.
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def policy_status(
    item: PolicyObject,
    previous: Object | None,
    acked_nodes: Mapping[str, str],
    connected_nodes: int,
    now: str,
    *,
    refused: str | None = None,
) -> dict[str, Any]:
    """The status subresource steer writes: Accepted (the spec is valid) and Programmed
    (every node whose Envoy is connected has acknowledged the config with this spec).
    `refused`: Envoy's message when it refused what this policy rendered to, and the
    policy is held back (steer.control.quarantine)."""
    old = list((previous or {}).get("conditions") or [])
    accepted = item.policy is not None
    message = "valid" if accepted else "; ".join(f"{e.path}: {e.message}" for e in item.errors)
    programmed = accepted and connected_nodes > 0 and len(acked_nodes) == connected_nodes
    if not accepted:
        programmed_reason, programmed_message = "Invalid", "not programmed: the spec is invalid"
    elif refused is not None:
        programmed = False
        programmed_reason = "RefusedByEnvoy"
        programmed_message = (
            f"not programmed: Envoy refused it ({refused}); the other policies are in force; "
            "fix: change this policy, and it is tried again"
        )
    elif programmed:
        programmed_reason = "Acknowledged"
        programmed_message = f"acknowledged by all {connected_nodes} connected nodes"
    else:
        programmed_reason = "Pending"
        programmed_message = f"{len(acked_nodes)} of {connected_nodes} connected nodes acknowledged"
    return {
        "observedGeneration": item.generation,
        "conditions": [
            _condition(
                "Accepted",
                accepted,
                reason="Valid" if accepted else "Invalid",
                message=message,
                generation=item.generation,
                previous=old,
                now=now,
            ),
            _condition(
                "Programmed",
                programmed,
                reason=programmed_reason,
                message=programmed_message,
                generation=item.generation,
                previous=old,
                now=now,
            ),
        ],
        "nodes": {
            node: {"ackedVersion": v, "acked": True} for node, v in sorted(acked_nodes.items())
        },
        "ackedNodes": len(acked_nodes),
    }


class PolicyValidator:
    """Validates HTTPPolicy objects once per resourceVersion: every pod event leads to a
    re-render, and validating 10k rules again each time took seconds."""

    def __init__(self) -> None:
        # object key -> (the resourceVersion it was validated at, the result)
        self._validated: dict[str, tuple[str, PolicyObject]] = {}

    def validate(self, objects: Iterable[Object]) -> list[PolicyObject]:
        validated: dict[str, tuple[str, PolicyObject]] = {}
        for obj in objects:
            key = _policy_key(obj)
            version = _string(_metadata(obj).get("resourceVersion"), "")
            cached = self._validated.get(key)
            if cached is None or not version or cached[0] != version:
                cached = (version, policy_from_object(obj))
            validated[key] = cached
        self._validated = validated
        return [result for _, result in validated.values()]
