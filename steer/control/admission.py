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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

from steer.constants import (
    ANNOTATION_DATAPLANE,
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_INJECT,
    API_GROUP,
    CONDITION_PODS_PROTECTED,
    LABEL_ALLOW_EXCLUSIONS,
    LABEL_ALLOW_OPT_OUT,
    POLICY_KIND,
    READINESS_GATE,
)

# load.py formats a pydantic error as "path: message; fix: ..." with its fix table, but only
# exposes that through parse_policies (YAML text). Reusing its two helpers keeps one fix
# table; a public `validate_policy_object` in load.py would remove this private import.
from steer.model.load import validate_policy
from steer.model.pod import (
    AnnotationError,
    OptOutIgnored,
    PodSteering,
    Unsteered,
    opt_out_allowed,
    parse_steering,
)
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
    if (
        operation == "UPDATE"
        and not request.get("subResource")
        and not isinstance(request.get("oldObject"), Mapping)
    ):
        raise MalformedReview("request.oldObject is missing or not an object at UPDATE")
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

    CREATE is mutated: `spec.readinessGates` cannot change once a pod exists, so the gate
    can only be added at creation. UPDATE is never mutated, but an update that changes
    the pod's steering (a `steer.dev/*` annotation or the `steer.dev/inject` label) is
    checked like a new pod, and refused where it would weaken the pod's policy without
    its namespace's permission (see `_review_pod_update`); every other update is allowed
    unchanged. A host-network pod is never steered (no gate, no annotations): it is
    allowed with a warning saying why.
    Subresources (status, binding, ephemeralcontainers, ...) are never mutated either.
    """
    request = _parse_request(review, _POD)
    uid = request["uid"]
    operation = request["operation"]
    if operation not in ("CREATE", "UPDATE") or request.get("subResource"):
        return _allow(uid)
    namespace = _namespace(request)
    metadata, spec, annotations, labels = _pod_parts(_object(request), "request.object")
    if operation == "UPDATE":
        old = request.get("oldObject")
        assert isinstance(old, Mapping)  # _parse_request checked it
        _, _, old_annotations, old_labels = _pod_parts(old, "request.oldObject")
        return _review_pod_update(
            uid,
            namespace,
            namespace_labels,
            (old_annotations, old_labels),
            (annotations, labels, spec),
        )

    host_network = spec.get("hostNetwork") is True
    steering, errors = parse_steering(
        annotations, namespace_labels, False, labels, host_network=host_network
    )
    if host_network:
        return _allow(uid, warnings=_host_network_warnings(annotations))
    # A value of steer.dev/inject that is neither enabled nor disabled could mean either;
    # the pod is validated as if steered, so the typo is refused rather than guessed at.
    inject_invalid = any(_is_invalid_inject(e) for e in errors)
    if not inject_invalid and not steering.inject:
        return _allow(uid, warnings=_ignored_annotations(annotations))

    problems = [
        *(
            _unknown_annotation(key)
            for key in sorted(annotations)
            if key.startswith(_ANNOTATION_PREFIX) and key not in KNOWN_ANNOTATIONS
        ),
        *(str(e) for e in _annotation_errors(errors)),
        *(_opt_out_not_permitted(e, namespace) for e in _opt_outs_ignored(errors)),
    ]
    # parse_steering reports a missing namespace permission as one error on the pseudo
    # annotation "steer.dev/exclude-*"; admission names each annotation it concerns (and
    # falls back to the model's own words should it ever report something else there).
    if other := [str(e) for e in errors if e.annotation not in KNOWN_ANNOTATIONS]:
        problems += _exclusions_not_permitted(annotations, namespace, namespace_labels) or other
    if problems:
        return _refuse(uid, problems)
    return _allow(uid, patch=_annotation_ops(metadata, annotations, steering) + _gate_ops(spec))


def _pod_parts(
    pod: Mapping[str, Any], where: str
) -> tuple[Mapping[str, Any], Mapping[str, Any], dict[str, str], dict[str, str]]:
    """A pod object's metadata, spec, annotations and labels, checked."""
    metadata = _field(pod, "metadata", where, dict)
    spec = _field(pod, "spec", where, dict)
    if metadata is None or spec is None:
        raise MalformedReview(f"{where} is not a pod: it lacks metadata or spec")
    annotations: dict[str, str] = _field(metadata, "annotations", f"{where}.metadata", dict) or {}
    if not all(isinstance(v, str) for v in annotations.values()):
        raise MalformedReview(f"{where}.metadata.annotations has a non-string value")
    labels: dict[str, str] = _field(metadata, "labels", f"{where}.metadata", dict) or {}
    return metadata, spec, annotations, labels


def _is_invalid_inject(error: AnnotationError) -> bool:
    return error.annotation == ANNOTATION_INJECT and not isinstance(error, OptOutIgnored)


def _annotation_errors(errors: Sequence[AnnotationError]) -> list[AnnotationError]:
    """Invalid values of known annotations (not the opt-outs the model ignored)."""
    return [
        e for e in errors if e.annotation in KNOWN_ANNOTATIONS and not isinstance(e, OptOutIgnored)
    ]


def _opt_outs_ignored(errors: Sequence[AnnotationError]) -> list[OptOutIgnored]:
    return [e for e in errors if isinstance(e, OptOutIgnored)]


def _opt_out_not_permitted(error: OptOutIgnored, namespace: str) -> str:
    # The node agent would ignore the opt-out and steer the pod anyway; refusing it here,
    # as an exclusion is refused, tells the pod's owner now rather than in an Event.
    return (
        f"{error.source} {error.annotation}={error.value!r}: opting out takes the pod out of "
        f"every policy that selects it, so it needs the namespace label "
        f"{LABEL_ALLOW_OPT_OUT}=true, which namespace {namespace} lacks; fix: remove the "
        f"{error.source}, or have the namespace owner run "
        f"`kubectl label namespace {namespace} {LABEL_ALLOW_OPT_OUT}=true`"
    )


def _host_network_warnings(annotations: Mapping[str, str]) -> list[str]:
    ignored = sorted(k for k in annotations if k.startswith(_ANNOTATION_PREFIX))
    also = f" ({', '.join(ignored)} ignored)" if ignored else ""
    return [
        "spec.hostNetwork: this pod shares the node's network namespace and address, which "
        "steer cannot steer: it gets no readiness gate and no policy applies to its "
        f"traffic{also}; policies that select it report condition {CONDITION_PODS_PROTECTED}"
        f"=False, reason {Unsteered.HOST_NETWORK.value}; fix: if it must be protected, run "
        "it without hostNetwork"
    ]


_SteerView = tuple[tuple[tuple[str, str], ...], str | None]


def _steer_view(annotations: Mapping[str, str], labels: Mapping[str, str]) -> _SteerView:
    """What of a pod decides its steering: its steer.dev/* annotations, its inject label."""
    steer = sorted((k, v) for k, v in annotations.items() if k.startswith(_ANNOTATION_PREFIX))
    return tuple(steer), labels.get(ANNOTATION_INJECT)


def _review_pod_update(
    uid: str,
    namespace: str,
    namespace_labels: Mapping[str, str],
    old: tuple[dict[str, str], dict[str, str]],
    new: tuple[dict[str, str], dict[str, str], Mapping[str, Any]],
) -> AdmissionReviewResponse:
    """An update of a running pod. The node agent reads its new annotations with the same
    model, which already ignores an opt-out or exclusion its namespace does not permit;
    this answer says so at once, to whoever made the change.

    Allowed unchanged: every update that leaves the steer.dev/* annotations and the
    steer.dev/inject label as they were (so unrelated updates are never blocked by steer,
    nor by a bad value the pod already had), and valid changes that keep or add steering.
    Refused, each problem on its own line: a changed annotation with an invalid value or
    an unknown name; a new opt-out or exclusion without the namespace's permission; any
    change that switches a steered pod's steering off (such as removing the opt-in label)
    without the namespace label steer.dev/allow-opt-out=true.
    """
    old_annotations, old_labels = old
    annotations, labels, spec = new
    if _steer_view(old_annotations, old_labels) == _steer_view(annotations, labels):
        return _allow(uid)
    if spec.get("hostNetwork") is True:
        return _allow(uid, warnings=_host_network_warnings(annotations))
    before, _ = parse_steering(old_annotations, namespace_labels, False, old_labels)
    after, errors = parse_steering(annotations, namespace_labels, False, labels)
    changed = {
        key
        for key in old_annotations.keys() | annotations.keys()
        if key.startswith(_ANNOTATION_PREFIX) and old_annotations.get(key) != annotations.get(key)
    }
    label_changed = old_labels.get(ANNOTATION_INJECT) != labels.get(ANNOTATION_INJECT)
    problems = [
        *(
            _opt_out_not_permitted(e, namespace)
            for e in _opt_outs_ignored(errors)
            if (e.annotation in changed if e.source == "annotation" else label_changed)
        ),
        *(
            str(e)
            for e in _annotation_errors(errors)
            if _is_invalid_inject(e) and e.annotation in changed
        ),
    ]
    if after.inject:
        problems += [
            *(
                _unknown_annotation(key)
                for key in sorted(changed & annotations.keys())
                if key not in KNOWN_ANNOTATIONS
            ),
            *(
                str(e)
                for e in _annotation_errors(errors)
                if not _is_invalid_inject(e) and e.annotation in changed
            ),
        ]
        if any(e.annotation not in KNOWN_ANNOTATIONS for e in errors):
            problems += _exclusions_not_permitted(
                annotations, namespace, namespace_labels, only=changed
            )
    elif before.inject and not opt_out_allowed(namespace_labels):
        problems.append(
            f"steer.dev/inject: this update would stop steering a running pod ("
            f"{after.unsteered.value if after.unsteered else 'not steered'}), which takes it "
            f"out of every policy that selects it; that needs the namespace label "
            f"{LABEL_ALLOW_OPT_OUT}=true, which namespace {namespace} lacks; fix: keep "
            f"{ANNOTATION_INJECT}={_ENABLED} on the pod, or have the namespace owner run "
            f"`kubectl label namespace {namespace} {LABEL_ALLOW_OPT_OUT}=true`"
        )
    if problems:
        return _refuse(uid, problems)
    warnings: list[str] = []
    if not (before.inject or after.inject):
        warnings += _ignored_annotations(annotations)
    if before.inject and not after.inject:
        warnings.append(
            "this pod is no longer steered: no policy applies to its traffic from now on "
            "(its readiness gate stays as it was)"
        )
    if after.inject and not before.inject and not _has_gate(spec):
        warnings.append(
            "this pod is steered from now on, but it has no readiness gate "
            f"{READINESS_GATE} (gates can only be added when a pod is created), so it may "
            "have taken traffic before its policy was in force; fix: delete the pod so that "
            "its controller creates it again"
        )
    return _allow(uid, warnings=warnings)


def _has_gate(spec: Mapping[str, Any]) -> bool:
    gates = spec.get("readinessGates")
    return isinstance(gates, list) and any(
        isinstance(g, Mapping) and g.get("conditionType") == READINESS_GATE for g in gates
    )


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
    annotations: Mapping[str, str],
    namespace: str,
    namespace_labels: Mapping[str, str],
    only: Collection[str] | None = None,
) -> list[str]:
    """One problem per exclusion annotation (of `only`, if given) that excludes something."""
    # Parsed as if permitted, to learn which annotations actually exclude something (an
    # annotation with an empty list excludes nothing and needs no permission).
    permitted, _ = parse_steering(annotations, {**namespace_labels, LABEL_ALLOW_EXCLUSIONS: "true"})
    return [
        f"annotation {key}={annotations[key]!r}: exclusions let traffic bypass L7 policy, so "
        f"they need the namespace label {LABEL_ALLOW_EXCLUSIONS}=true, which namespace "
        f"{namespace} lacks; fix: remove the annotation, or have the namespace owner run "
        f"`kubectl label namespace {namespace} {LABEL_ALLOW_EXCLUSIONS}=true`"
        for key, value in _exclusion_values(permitted).items()
        if value and (only is None or key in only)
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
