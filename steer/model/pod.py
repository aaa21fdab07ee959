"""Pods as steer sees them, and their operator annotations parsed and validated."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Final

from steer.constants import (
    ANNOTATION_DATAPLANE,
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_INJECT,
    LABEL_ALLOW_EXCLUSIONS,
    LABEL_ALLOW_OPT_OUT,
)

_ASCII_DIGITS = re.compile(r"[0-9]{1,5}")


class Dataplane(StrEnum):
    AUTO = "auto"
    EBPF = "ebpf"
    IPTABLES = "iptables"


class Unsteered(StrEnum):
    """Why a pod is not steered; the values are the reasons a policy's status gives."""

    # `steer.dev/inject: disabled` where it counts: the namespace's label, or the pod's own
    # annotation or label in a namespace labelled LABEL_ALLOW_OPT_OUT=true.
    OPTED_OUT = "OptedOut"
    # In a cluster, steering is opt-in, and neither the pod nor its namespace opted in.
    NOT_OPTED_IN = "NotOptedIn"
    # spec.hostNetwork: the pod shares the node's network namespace (and address), so
    # there is no pod netns or cgroup boundary of its own to steer at.
    HOST_NETWORK = "HostNetwork"


UNSTEERED_WHY: Final[dict[Unsteered, str]] = {
    Unsteered.OPTED_OUT: f"opted out ({ANNOTATION_INJECT}: disabled)",
    Unsteered.NOT_OPTED_IN: f"not opted in (no {ANNOTATION_INJECT}: enabled on pod or namespace)",
    Unsteered.HOST_NETWORK: "uses the node's network (spec.hostNetwork), which steer cannot steer",
}


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # Node-side interface the pod's traffic enters the node on (lab veth or CNI veth).
    interface: str = ""
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    # Node-local handles on the pod's sandbox, for the eBPF datapath: the cgroup v2 path
    # its processes run in, and the named network namespace (for revoking sockets).
    cgroup: str = ""
    netns: str = ""
    node: str = ""
    # Whether a pod steered by neither its annotation nor its namespace is steered.
    inject_default: bool = True
    # spec.hostNetwork: never steered (Unsteered.HOST_NETWORK); `ip` is then the node's.
    host_network: bool = False

    @cached_property
    def key(self) -> str:
        # Asked for hundreds of thousands of times a minute under churn at 1k pods.
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AnnotationError:
    annotation: str
    value: str
    message: str

    def __str__(self) -> str:
        return f"annotation {self.annotation}={self.value!r}: {self.message}"


@dataclass(frozen=True)
class OptOutIgnored(AnnotationError):
    """The pod said `steer.dev/inject: disabled` (its annotation, or its label when
    `source` is "label") where its namespace does not allow opting out: it stays steered."""

    source: str = "annotation"

    def __str__(self) -> str:
        return f"{self.source} {self.annotation}={self.value!r}: {self.message}"


@dataclass(frozen=True)
class PodSteering:
    """What the annotations ask for, after validation and the namespace's permission."""

    inject: bool = True
    dataplane: Dataplane = Dataplane.AUTO
    exclude_outbound_ports: frozenset[int] = frozenset()
    exclude_inbound_ports: frozenset[int] = frozenset()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    # Why `inject` is False (None while it is True).
    unsteered: Unsteered | None = None


def _parse_ports(annotation: str, value: str) -> tuple[frozenset[int], list[AnnotationError]]:
    ports: set[int] = set()
    for item in filter(None, (p.strip() for p in value.split(","))):
        # ASCII digits only: str.isdigit() also accepts '²', which int() then rejects.
        if not _ASCII_DIGITS.fullmatch(item) or not 1 <= int(item) <= 65535:
            return frozenset(), [
                AnnotationError(annotation, value, f"{item!r} is not a port; fix: e.g. '8080,9090'")
            ]
        ports.add(int(item))
    return frozenset(ports), []


def _parse_cidrs(annotation: str, value: str) -> tuple[tuple[str, ...], list[AnnotationError]]:
    cidrs: list[str] = []
    for item in filter(None, (c.strip() for c in value.split(","))):
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            return (), [
                AnnotationError(
                    annotation, value, f"{item!r} is not a CIDR ({exc}); fix: e.g. '10.0.0.0/8'"
                )
            ]
        if net.version != 4:
            return (), [AnnotationError(annotation, value, f"{item!r} is IPv6; fix: IPv4 only")]
        cidrs.append(str(net))
    return tuple(cidrs), []


def _parse_choice(
    annotation: str, value: str, choices: tuple[str, ...]
) -> tuple[str | None, list[AnnotationError]]:
    if value in choices:
        return value, []
    return None, [AnnotationError(annotation, value, f"fix: use one of {', '.join(choices)}")]


def opt_out_allowed(namespace_labels: Mapping[str, str]) -> bool:
    return namespace_labels.get(LABEL_ALLOW_OPT_OUT) == "true"


def _inject_decision(
    annotations: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    default: bool,
    pod_labels: Mapping[str, str] | None,
) -> tuple[bool, Unsteered | None, list[AnnotationError]]:
    """Whether the pod is steered, why not, and the pod's opt-out if it was ignored.

    The pod's annotation decides, else its label (a label lets a webhook select single
    pods), else its namespace's label, else `default`: opt-out in the local lab (every lab
    pod is steered), opt-in in a cluster (steering a namespace nobody labelled would gate
    pods nobody asked to steer). A pod's own `disabled` counts only where its namespace
    carries LABEL_ALLOW_OPT_OUT=true: whoever may edit a pod must not be able to take it
    out of the policies that select it. Elsewhere it is skipped, and the next source
    decides; it is reported only if that changes the outcome (the pod stays steered).
    """
    ignored: list[AnnotationError] = []
    sources = (("annotation", annotations), ("label", pod_labels or {}))
    for kind, source in sources:
        value = source.get(ANNOTATION_INJECT)
        if value == "enabled":
            return True, None, ignored
        if value == "disabled":
            if opt_out_allowed(namespace_labels):
                return False, Unsteered.OPTED_OUT, []
            ignored.append(
                OptOutIgnored(
                    ANNOTATION_INJECT,
                    value,
                    "opt-out ignored, the pod stays steered: its namespace lacks label "
                    f"{LABEL_ALLOW_OPT_OUT}=true; fix: remove it, or ask the namespace owner "
                    "to set that label",
                    source=kind,
                )
            )
    value = namespace_labels.get(ANNOTATION_INJECT)
    steered = value == "enabled" if value in ("enabled", "disabled") else default
    if steered:
        return True, None, ignored
    return False, Unsteered.OPTED_OUT if value == "disabled" else Unsteered.NOT_OPTED_IN, []


def parse_steering(
    annotations: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    default_inject: bool = True,
    pod_labels: Mapping[str, str] | None = None,
    host_network: bool = False,
) -> tuple[PodSteering, list[AnnotationError]]:
    """Valid annotations take effect; each invalid one is reported and left at its default.

    Exclusions count only where the namespace carries LABEL_ALLOW_EXCLUSIONS=true,
    because an exclusion lets traffic past L7 policy; a pod's own opt-out counts only
    where it carries LABEL_ALLOW_OPT_OUT=true (an ignored one is an `OptOutIgnored`
    error). A host-network pod is never steered.
    """
    errors: list[AnnotationError] = []
    inject, unsteered, ignored = _inject_decision(
        annotations, namespace_labels, default_inject, pod_labels
    )
    if host_network:
        inject, unsteered, ignored = False, Unsteered.HOST_NETWORK, []
    errors += ignored
    if (raw := annotations.get(ANNOTATION_INJECT)) is not None:
        errors += _parse_choice(ANNOTATION_INJECT, raw, ("enabled", "disabled"))[1]
    dataplane = Dataplane.AUTO
    if (raw := annotations.get(ANNOTATION_DATAPLANE)) is not None:
        choice, errs = _parse_choice(ANNOTATION_DATAPLANE, raw, tuple(d.value for d in Dataplane))
        errors += errs
        dataplane = Dataplane(choice) if choice else Dataplane.AUTO

    out_ports, errs = _parse_ports(
        ANNOTATION_EXCLUDE_OUTBOUND_PORTS, annotations.get(ANNOTATION_EXCLUDE_OUTBOUND_PORTS, "")
    )
    errors += errs
    in_ports, errs = _parse_ports(
        ANNOTATION_EXCLUDE_INBOUND_PORTS, annotations.get(ANNOTATION_EXCLUDE_INBOUND_PORTS, "")
    )
    errors += errs
    cidrs, errs = _parse_cidrs(
        ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, annotations.get(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, "")
    )
    errors += errs

    wants_exclusions = bool(out_ports or in_ports or cidrs)
    if wants_exclusions and namespace_labels.get(LABEL_ALLOW_EXCLUSIONS) != "true":
        errors.append(
            AnnotationError(
                "steer.dev/exclude-*",
                "",
                f"exclusions ignored: the namespace lacks label {LABEL_ALLOW_EXCLUSIONS}=true; "
                "fix: ask the namespace owner to set it",
            )
        )
        out_ports, in_ports, cidrs = frozenset(), frozenset(), ()
    return _shared(PodSteering(inject, dataplane, out_ports, in_ports, cidrs, unsteered)), errors


# One object per distinct steering: pods mostly carry the same few, and a pod change
# otherwise left each changed pod with a PodSteering (and two frozensets) of its own where
# it had shared one, which showed as memory growth over a churn run.
_STEERINGS: dict[PodSteering, PodSteering] = {}
_STEERINGS_MAX = 4096


def _shared(steering: PodSteering) -> PodSteering:
    found = _STEERINGS.get(steering)
    if found is None:
        if len(_STEERINGS) >= _STEERINGS_MAX:
            _STEERINGS.clear()
        found = _STEERINGS[steering] = steering
    return found


def steering_of(pod: Pod) -> tuple[PodSteering, list[AnnotationError]]:
    """`parse_steering` with everything the pod carries, host network included."""
    return parse_steering(
        pod.annotations,
        pod.namespace_labels,
        pod.inject_default,
        pod.labels,
        host_network=pod.host_network,
    )
