"""AdmissionReview v1 in, AdmissionReview v1 out: what the pod and HTTPPolicy webhooks decide.

Pure: no aiohttp, no Kubernetes client. The server (steer.control.webhook) looks up the
pod's namespace labels and passes them in, because an AdmissionReview carries the pod but
not its namespace; everything else is a function of the review, so each decision can be
golden-tested on reviews shaped exactly as the API server sends them.

Annotations are parsed by the same code the agent uses (steer.model.pod.parse_steering) and
policies are validated by the same model the policy loader uses, so admission can never
accept what the node would refuse, or the other way round.
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

from steer.constants import (
    ANNOTATION_DATAPLANE,
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_INJECT,
    API_GROUP,
    LABEL_ALLOW_EXCLUSIONS,
    POLICY_KIND,
    READINESS_GATE,
)

# load.py formats a pydantic error as "path: message; fix: ..." with its fix table, but only
# exposes that through parse_policies (YAML text). Reusing its two helpers keeps one fix
# table; a public `validate_policy_object` in load.py would remove this private import.
from steer.model.load import validate_policy
from steer.model.pod import PodSteering, inject_enabled, parse_steering
from steer.model.policy import EgressRule, HTTPPolicy, IngressRule

ADMISSION_API_VERSION: Final = "admission.k8s.io/v1"
ADMISSION_KIND: Final = "AdmissionReview"
# What the API server itself answers for a forbidden request. With the reason set, kubectl
# prints `Error from server (Forbidden): ... admission webhook "..." denied the request: ...`.
REFUSED_CODE: Final = 403
REFUSED_REASON: Final = "Forbidden"

_ENABLED: Final = "enabled"
_ANNOTATION_PREFIX: Final = f"{API_GROUP}/"
KNOWN_ANNOTATIONS: Final = (
    ANNOTATION_INJECT,
    ANNOTATION_DATAPLANE,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
)

# --- AdmissionReview v1 wire shapes (k8s.io/api/admission/v1) ----------------------------

Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
_OPERATIONS: Final = ("CREATE", "UPDATE", "DELETE", "CONNECT")


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class GroupVersionResource(TypedDict):
    group: str
    version: str
    resource: str


class UserInfo(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]


class AdmissionRequest(TypedDict):
    uid: str
    kind: GroupVersionKind
    resource: GroupVersionResource
    operation: Operation
    userInfo: UserInfo
    subResource: NotRequired[str]
    requestKind: NotRequired[GroupVersionKind]
    requestResource: NotRequired[GroupVersionResource]
    requestSubResource: NotRequired[str]
    # Empty (so omitted) at CREATE through generateName: the API server names the pod
    # after mutating admission.
    name: NotRequired[str]
    namespace: NotRequired[str]
    # Null at DELETE (object) and at CREATE (oldObject).
    object: NotRequired[dict[str, Any] | None]
    oldObject: NotRequired[dict[str, Any] | None]
    dryRun: NotRequired[bool]
    options: NotRequired[dict[str, Any] | None]


class AdmissionReviewRequest(TypedDict):
    apiVersion: Literal["admission.k8s.io/v1"]
    kind: Literal["AdmissionReview"]
    request: AdmissionRequest


class Status(TypedDict):
    code: int
    reason: str
    message: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    status: NotRequired[Status]
    patchType: NotRequired[Literal["JSONPatch"]]
    # base64 of a JSON Patch (RFC 6902) document.
    patch: NotRequired[str]
    warnings: NotRequired[list[str]]


class AdmissionReviewResponse(TypedDict):
    apiVersion: Literal["admission.k8s.io/v1"]
    kind: Literal["AdmissionReview"]
    response: AdmissionResponse


class JSONPatchOp(TypedDict):
    op: Literal["add", "replace"]
    path: str
    value: object


class MalformedReview(ValueError):
    """The input is not an AdmissionReview v1 request this webhook can answer.

    The server answers HTTP 400 with the reason; the API server then applies the webhook's
    failurePolicy, which is the right outcome for a wiring mistake (no decision was made).
    """


# --- requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class _GroupKind:
    group: str
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


_POD: Final = _GroupKind("", "Pod")
_HTTP_POLICY: Final = _GroupKind(API_GROUP, POLICY_KIND)


def _parse_request(review: Mapping[str, Any], admits: _GroupKind) -> AdmissionRequest:
    """The review's request, checked for every field this module relies on."""
    if not isinstance(review, Mapping):
        raise MalformedReview("expected a JSON object holding an AdmissionReview")
    if (review.get("apiVersion"), review.get("kind")) != (ADMISSION_API_VERSION, ADMISSION_KIND):
        raise MalformedReview(
            f"expected apiVersion {ADMISSION_API_VERSION!r} and kind {ADMISSION_KIND!r}, got "
            f"{review.get('apiVersion')!r} and {review.get('kind')!r}; fix: set the webhook "
            "configuration's admissionReviewVersions to [v1]"
        )
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise MalformedReview("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid is missing or empty")
    kind = request.get("kind")
    # A subresource request carries the subresource's kind (Binding, Eviction, ...). Both
    # webhooks allow those unchanged; refusing one here as miswired would, under
    # failurePolicy Fail, stop pods being scheduled if a configuration said `pods/*`.
    if not request.get("subResource") and (
        not isinstance(kind, Mapping)
        or _GroupKind(str(kind.get("group")), str(kind.get("kind"))) != admits
    ):
        raise MalformedReview(
            f"request.kind is {kind!r} but this webhook admits {admits}; fix: the rules of "
            "the webhook configuration that points here"
        )
    operation = request.get("operation")
    if operation not in _OPERATIONS:
        raise MalformedReview(
            f"request.operation {operation!r} is not one of {', '.join(_OPERATIONS)}"
        )
    if operation in ("CREATE", "UPDATE") and not isinstance(request.get("object"), Mapping):
        raise MalformedReview(f"request.object is missing or not an object at {operation}")
    return cast(AdmissionRequest, request)


def _object(request: AdmissionRequest) -> Mapping[str, Any]:
    # _parse_request has checked it for CREATE and UPDATE, the only callers.
    obj = request.get("object")
    assert isinstance(obj, Mapping)
    return obj


def _namespace(request: AdmissionRequest) -> str:
    namespace = request.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise MalformedReview("request.namespace is missing: pods are namespaced")
    return namespace


def request_namespace(review: Mapping[str, Any]) -> str:
    """The namespace of a pod review, for the server's namespace-label lookup."""
    return _namespace(_parse_request(review, _POD))


def _field(parent: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    """parent[key] if it has the JSON type `kind`, None if absent or null."""
    value = parent.get(key)
    if value is not None and not isinstance(value, kind):
        raise MalformedReview(f"{where}.{key} is not a JSON {kind.__name__}")
    return value


# --- responses ----------------------------------------------------------------------


def _review(response: AdmissionResponse) -> AdmissionReviewResponse:
    return {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}


def _allow(
    uid: str, patch: Sequence[JSONPatchOp] = (), warnings: Sequence[str] = ()
) -> AdmissionReviewResponse:
    response: AdmissionResponse = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch), separators=(",", ":")).encode()
        ).decode()
    if warnings:
        response["warnings"] = list(warnings)
    return _review(response)


def _refuse(uid: str, problems: Sequence[str]) -> AdmissionReviewResponse:
    # One problem per line: kubectl prints the message as is, so an operator sees every
    # problem at once instead of fixing them one round trip at a time.
    status: Status = {
        "code": REFUSED_CODE,
        "reason": REFUSED_REASON,
        "message": "\n".join(problems),
    }
    return _review({"uid": uid, "allowed": False, "status": status})


# --- pods -----------------------------------------------------------------------------


def review_pod(
    review: Mapping[str, Any], namespace_labels: Mapping[str, str]
) -> AdmissionReviewResponse:
    """The mutating pod webhook: steer a new pod, or refuse it with every problem named.

    Only CREATE is mutated. `spec.readinessGates` cannot change once a pod exists, so the
    gate can only be added at creation. Annotations, by contrast, may still change on a
    running pod (switching `steer.dev/dataplane` is supported); such updates are allowed
    unchanged, since refusing them would also block unrelated updates such as a
    controller's label change. steer reads them with the same parser, which reports an
    invalid value and keeps that annotation's default.
    Subresources (status, binding, ephemeralcontainers, ...) are never mutated either.
    """
    request = _parse_request(review, _POD)
    uid = request["uid"]
    if request["operation"] != "CREATE" or request.get("subResource"):
        return _allow(uid)
    namespace = _namespace(request)
    pod = _object(request)
    metadata = _field(pod, "metadata", "request.object", dict)
    spec = _field(pod, "spec", "request.object", dict)
    if metadata is None or spec is None:
        raise MalformedReview("request.object is not a pod: it lacks metadata or spec")
    annotations: dict[str, str] = _field(metadata, "annotations", "request.object.metadata", dict)
    annotations = annotations or {}
    if not all(isinstance(v, str) for v in annotations.values()):
        raise MalformedReview("request.object.metadata.annotations has a non-string value")

    labels: dict[str, str] = _field(metadata, "labels", "request.object.metadata", dict) or {}
    steering, errors = parse_steering(annotations, namespace_labels, pod_labels=labels)
    # A value of steer.dev/inject that is neither enabled nor disabled could mean either;
    # the pod is validated as if steered, so the typo is refused rather than guessed at.
    inject_invalid = any(e.annotation == ANNOTATION_INJECT for e in errors)
    if not inject_invalid and not _opted_in(annotations, labels, namespace_labels):
        return _allow(uid, warnings=_ignored_annotations(annotations))

    problems = [
        *(
            _unknown_annotation(key)
            for key in sorted(annotations)
            if key.startswith(_ANNOTATION_PREFIX) and key not in KNOWN_ANNOTATIONS
        ),
        *(str(e) for e in errors if e.annotation in KNOWN_ANNOTATIONS),
    ]
    # parse_steering reports a missing namespace permission as one error on the pseudo
    # annotation "steer.dev/exclude-*"; admission names each annotation it concerns (and
    # falls back to the model's own words should it ever report something else there).
    if other := [str(e) for e in errors if e.annotation not in KNOWN_ANNOTATIONS]:
        problems += _exclusions_not_permitted(annotations, namespace, namespace_labels) or other
    if problems:
        return _refuse(uid, problems)
    return _allow(uid, patch=_annotation_ops(metadata, annotations, steering) + _gate_ops(spec))


def _opted_in(
    annotations: Mapping[str, str], labels: Mapping[str, str], namespace_labels: Mapping[str, str]
) -> bool:
    """Admission steers by opt-in: the pod's annotation or label, else its namespace's."""
    return inject_enabled(annotations, namespace_labels, default=False, pod_labels=labels)


def _unknown_annotation(key: str) -> str:
    # A misspelt key would otherwise be ignored silently, and the exclusion or dataplane its
    # owner asked for would quietly not apply.
    close = difflib.get_close_matches(key, KNOWN_ANNOTATIONS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"annotation {key}: unknown; fix: {hint}steer reads only {', '.join(KNOWN_ANNOTATIONS)}"


def _ignored_annotations(annotations: Mapping[str, str]) -> list[str]:
    ignored = sorted(
        k for k in annotations if k.startswith(_ANNOTATION_PREFIX) and k != ANNOTATION_INJECT
    )
    if not ignored:
        return []
    return [
        f"{', '.join(ignored)} ignored: this pod is not steered; fix: annotate it "
        f"{ANNOTATION_INJECT}={_ENABLED}, or label its namespace {ANNOTATION_INJECT}={_ENABLED}"
    ]


def _exclusion_values(steering: PodSteering) -> dict[str, str]:
    """Each exclusion annotation's value in canonical form: sorted, deduplicated, no spaces,
    CIDRs as the network address over the prefix length."""
    cidrs = sorted({ipaddress.IPv4Network(c) for c in steering.exclude_outbound_cidrs})
    return {
        ANNOTATION_EXCLUDE_OUTBOUND_PORTS: ",".join(
            map(str, sorted(steering.exclude_outbound_ports))
        ),
        ANNOTATION_EXCLUDE_INBOUND_PORTS: ",".join(
            map(str, sorted(steering.exclude_inbound_ports))
        ),
        ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: ",".join(map(str, cidrs)),
    }


def _exclusions_not_permitted(
    annotations: Mapping[str, str], namespace: str, namespace_labels: Mapping[str, str]
) -> list[str]:
    # Parsed as if permitted, to learn which annotations actually exclude something (an
    # annotation with an empty list excludes nothing and needs no permission).
    permitted, _ = parse_steering(annotations, {**namespace_labels, LABEL_ALLOW_EXCLUSIONS: "true"})
    return [
        f"annotation {key}={annotations[key]!r}: exclusions let traffic bypass L7 policy, so "
        f"they need the namespace label {LABEL_ALLOW_EXCLUSIONS}=true, which namespace "
        f"{namespace} lacks; fix: remove the annotation, or have the namespace owner run "
        f"`kubectl label namespace {namespace} {LABEL_ALLOW_EXCLUSIONS}=true`"
        for key, value in _exclusion_values(permitted).items()
        if value
    ]


def _pointer(*tokens: str) -> str:
    """A JSON Pointer (RFC 6901): '~' and '/' inside a token are escaped, '~' first."""
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _annotation_ops(
    metadata: Mapping[str, Any], annotations: Mapping[str, str], steering: PodSteering
) -> list[JSONPatchOp]:
    # Defaults are stamped so that `kubectl get pod -o yaml` shows how the pod is steered,
    # and normalised values so that the agent and every reader see one spelling.
    wanted = {ANNOTATION_INJECT: _ENABLED, ANNOTATION_DATAPLANE: steering.dataplane.value}
    wanted |= {k: v for k, v in _exclusion_values(steering).items() if k in annotations}
    if not metadata.get("annotations"):
        # Adding a member below a missing object fails the whole patch: add the object.
        return [{"op": "add", "path": _pointer("metadata", "annotations"), "value": wanted}]
    return [
        {
            "op": "replace" if key in annotations else "add",
            "path": _pointer("metadata", "annotations", key),
            "value": value,
        }
        for key, value in wanted.items()
        if annotations.get(key) != value
    ]


def _gate_ops(spec: Mapping[str, Any]) -> list[JSONPatchOp]:
    gate = {"conditionType": READINESS_GATE}
    gates = _field(spec, "readinessGates", "request.object.spec", list)
    if not gates:
        return [{"op": "add", "path": _pointer("spec", "readinessGates"), "value": [gate]}]
    if any(isinstance(g, Mapping) and g.get("conditionType") == READINESS_GATE for g in gates):
        return []
    # "-" appends, keeping the gates other controllers put there.
    return [{"op": "add", "path": _pointer("spec", "readinessGates", "-"), "value": gate}]


# --- HTTPPolicy -----------------------------------------------------------------------


def review_policy(review: Mapping[str, Any]) -> AdmissionReviewResponse:
    """The validating HTTPPolicy webhook: the policy model plus no contradictory rules.

    DELETE (and CONNECT, which HTTPPolicy has none of) is always allowed: removing a policy
    needs no validation. Status updates go through the status subresource, which is not
    validated either: steer-control writes it.
    """
    request = _parse_request(review, _HTTP_POLICY)
    uid = request["uid"]
    if request["operation"] not in ("CREATE", "UPDATE") or request.get("subResource"):
        return _allow(uid)
    problems = _policy_problems(_object(request))
    return _refuse(uid, problems) if problems else _allow(uid)


def _policy_problems(obj: Mapping[str, Any]) -> list[str]:
    result = validate_policy(dict(obj), "")
    if not isinstance(result, HTTPPolicy):
        return [f"{e.path or '(object)'}: {e.message}" for e in result]
    return _contradictions(result)


def _contradictions(policy: HTTPPolicy) -> list[str]:
    """Rules of one section that match the same traffic with different actions.

    Deny beats Allow, so such a pair is never ambiguous at runtime, but the Allow rule can
    never take effect: almost certainly not what the author meant.
    """
    problems = []
    sections = (("ingress", "from", policy.spec.ingress), ("egress", "to", policy.spec.egress))
    for direction, peers, section in sections:
        if section is None:
            continue
        earlier: dict[str, list[int]] = {}
        rules: tuple[IngressRule | EgressRule, ...] = section.rules
        for index, rule in enumerate(rules):
            same = earlier.setdefault(_match_key(rule), [])
            clash = next((i for i in same if rules[i].action != rule.action), None)
            if clash is not None:
                problems.append(
                    f"spec.{direction}.rules[{index}]: same {peers}, ports and http as "
                    f"spec.{direction}.rules[{clash}], but action {rule.action} instead of "
                    f"{rules[clash].action}; fix: remove one of the two (Deny wins, so the "
                    "Allow rule has no effect)"
                )
            same.append(index)
    return problems


def _match_key(rule: IngressRule | EgressRule) -> str:
    """Equal for rules that match the same traffic. Every list in a rule means "any of" or
    "all of", so order and repeats carry no meaning and lists are compared as sets."""
    dumped = rule.model_dump(mode="json", include={"peers", "ports", "http"})
    return json.dumps(_as_sets(dumped), sort_keys=True)


def _as_sets(value: object) -> object:
    if isinstance(value, dict):
        return {k: _as_sets(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(_as_sets(v), sort_keys=True) for v in value})
    return value
