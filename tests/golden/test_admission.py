"""Admission decisions on AdmissionReview v1 requests shaped as the API server sends them.

Each case is `admission/<case>.request.json`; the expected answer is `<case>.response.json`,
and a mutating answer's base64 patch is kept decoded in `<case>.patch.json` so that a
review of the golden shows the JSON Patch itself.
Regenerate: STEER_REGEN_GOLDEN=1 pytest tests/golden/test_admission.py
"""

from __future__ import annotations

import base64
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from steer.constants import (
    ANNOTATION_INJECT,
    LABEL_ALLOW_EXCLUSIONS,
    LABEL_ALLOW_OPT_OUT,
    READINESS_GATE,
)
from steer.control.admission import (
    KNOWN_ANNOTATIONS,
    MalformedReview,
    request_namespace,
    review_pod,
    review_policy,
)

DATA = Path(__file__).parent / "admission"

# The namespaces the requests come from, with their labels as the API server returns them.
NAMESPACE_LABELS = {
    "shop": {"kubernetes.io/metadata.name": "shop", ANNOTATION_INJECT: "enabled"},
    "payments": {
        "kubernetes.io/metadata.name": "payments",
        ANNOTATION_INJECT: "enabled",
        LABEL_ALLOW_EXCLUSIONS: "true",
    },
    "legacy": {"kubernetes.io/metadata.name": "legacy"},
    "batch": {
        "kubernetes.io/metadata.name": "batch",
        ANNOTATION_INJECT: "enabled",
        LABEL_ALLOW_OPT_OUT: "true",
    },
}

POD_CASES = (
    "pod-namespace-opted-in-gets-gate-and-defaults",
    "pod-opted-out-with-namespace-permission-is-untouched",
    "pod-opt-out-refused-without-namespace-permission",
    "pod-host-network-is-not-steered-and-warned",
    "pod-namespace-not-opted-in-is-untouched",
    "pod-not-steered-is-warned-of-ignored-annotations",
    "pod-invalid-dataplane-is-refused",
    "pod-invalid-inject-value-is-refused",
    "pod-exclusion-refused-without-namespace-permission",
    "pod-exclusion-allowed-and-normalised-with-permission",
    "pod-existing-readiness-gates-are-kept",
    "pod-already-steered-is-not-patched-again",
    "pod-without-annotations-gets-the-annotations-object",
    "pod-unknown-steer-annotation-is-refused",
    "pod-update-is-allowed-untouched",
    "pod-update-opt-out-refused-without-namespace-permission",
    "pod-update-opt-out-with-namespace-permission-is-allowed-with-warning",
    "pod-update-adding-exclusion-refused-without-namespace-permission",
    "pod-update-removing-opt-in-is-refused",
    "pod-update-leaving-steering-alone-is-allowed",
)
POLICY_CASES = (
    "policy-valid-is-allowed",
    "policy-bad-regex-is-refused-naming-the-path",
    "policy-contradictory-rules-are-refused",
    "policy-delete-is-allowed",
)
MUTATED = (
    "pod-namespace-opted-in-gets-gate-and-defaults",
    "pod-exclusion-allowed-and-normalised-with-permission",
    "pod-existing-readiness-gates-are-kept",
    "pod-without-annotations-gets-the-annotations-object",
)


def request(case: str) -> dict[str, Any]:
    review: dict[str, Any] = json.loads((DATA / f"{case}.request.json").read_text())
    return review


def answer(case: str) -> dict[str, Any]:
    review = request(case)
    if case.startswith("pod-"):
        return dict(review_pod(review, NAMESPACE_LABELS[request_namespace(review)]))
    return dict(review_policy(review))


def decoded_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"], validate=True))
    return patch


def check_golden(path: Path, document: object) -> None:
    text = json.dumps(document, indent=2) + "\n"
    if os.environ.get("STEER_REGEN_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with STEER_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs from golden; review, then regenerate"


@pytest.mark.parametrize("case", POD_CASES + POLICY_CASES)
def test_answer_matches_golden(case: str) -> None:
    review = answer(case)
    response = review["response"] = dict(review["response"])
    assert response["uid"] == request(case)["request"]["uid"]
    patch_file = DATA / f"{case}.patch.json"
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        check_golden(patch_file, decoded_patch(response))
        response["patch"] = f"<base64 of {patch_file.name}>"
    elif os.environ.get("STEER_REGEN_GOLDEN"):
        patch_file.unlink(missing_ok=True)
    assert ("patch" in response) == patch_file.exists(), f"stale {patch_file.name}"
    check_golden(DATA / f"{case}.response.json", review)


def test_every_request_file_is_a_case() -> None:
    on_disk = {p.name.removesuffix(".request.json") for p in DATA.glob("*.request.json")}
    assert on_disk == set(POD_CASES + POLICY_CASES)


# --- properties the goldens show, asserted so that a regeneration cannot lose them ----


def apply_patch(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace as the API server applies them: a missing parent fails, and
    `replace` needs the member to exist."""
    out = copy.deepcopy(document)
    for op in ops:
        *parents, last = [
            t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]
        ]
        target: Any = out
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if isinstance(target, list):
            assert op["op"] == "add"
            target.insert(len(target) if last == "-" else int(last), op["value"])
        else:
            assert (last in target) == (op["op"] == "replace"), op
            target[last] = op["value"]
    return out


@pytest.mark.parametrize("case", MUTATED)
def test_patch_steers_the_pod_and_is_idempotent(case: str) -> None:
    review = request(case)
    pod = review["request"]["object"]
    patched = apply_patch(pod, decoded_patch(answer(case)["response"]))
    gates = patched["spec"]["readinessGates"]
    assert [g["conditionType"] for g in gates].count(READINESS_GATE) == 1
    # Gates other controllers set stay, in their order.
    before = pod["spec"].get("readinessGates", [])
    assert gates[: len(before)] == before
    annotations = patched["metadata"]["annotations"]
    assert annotations[ANNOTATION_INJECT] == "enabled"
    assert "steer.dev/dataplane" in annotations
    assert (
        annotations.items()
        >= {
            k: v
            for k, v in (pod["metadata"].get("annotations") or {}).items()
            if "steer.dev" not in k
        }.items()
    )
    # A reinvoked webhook (reinvocationPolicy: IfNeeded) sees its own output: no new patch.
    review["request"]["object"] = patched
    again = review_pod(review, NAMESPACE_LABELS[request_namespace(review)])["response"]
    assert again["allowed"] and "patch" not in again


def test_normalised_exclusions() -> None:
    pod = request("pod-exclusion-allowed-and-normalised-with-permission")["request"]["object"]
    ops = decoded_patch(answer("pod-exclusion-allowed-and-normalised-with-permission")["response"])
    annotations = apply_patch(pod, ops)["metadata"]["annotations"]
    assert annotations["steer.dev/exclude-outbound-ports"] == "5432,6379"
    assert annotations["steer.dev/exclude-outbound-cidrs"] == "10.0.0.0/8,192.168.10.0/24"
    assert annotations["steer.dev/dataplane"] == "iptables"
    # Already canonical values are left alone rather than rewritten to themselves.
    assert not any(op["path"].endswith("exclude-inbound-ports") for op in ops)


OPT_OUT_FIX = "kubectl label namespace shop steer.dev/allow-opt-out=true"


@pytest.mark.parametrize(
    ("case", "lines"),
    [
        (
            "pod-invalid-dataplane-is-refused",
            [["steer.dev/dataplane", "'fast'", "fix: use one of auto, ebpf, iptables"]],
        ),
        ("pod-invalid-inject-value-is-refused", [["steer.dev/inject", "'true'", "fix:"]]),
        (
            "pod-exclusion-refused-without-namespace-permission",
            [
                [name, "kubectl label namespace shop steer.dev/allow-exclusions=true"]
                for name in ("steer.dev/exclude-outbound-ports", "steer.dev/exclude-outbound-cidrs")
            ],
        ),
        (
            "pod-unknown-steer-annotation-is-refused",
            [["steer.dev/exclude-outbound-port:", *KNOWN_ANNOTATIONS]],
        ),
        (
            "pod-opt-out-refused-without-namespace-permission",
            [["annotation steer.dev/inject='disabled'", OPT_OUT_FIX]],
        ),
        (
            "pod-update-opt-out-refused-without-namespace-permission",
            [["annotation steer.dev/inject='disabled'", OPT_OUT_FIX]],
        ),
        (
            "pod-update-adding-exclusion-refused-without-namespace-permission",
            [
                [
                    "steer.dev/exclude-outbound-ports='443'",
                    "kubectl label namespace shop steer.dev/allow-exclusions=true",
                ]
            ],
        ),
        (
            "pod-update-removing-opt-in-is-refused",
            [
                [
                    "stop steering a running pod (NotOptedIn)",
                    "kubectl label namespace legacy steer.dev/allow-opt-out=true",
                ]
            ],
        ),
        (
            "policy-bad-regex-is-refused-naming-the-path",
            [
                ["spec.ingress.rules[0].http.paths[1]", "refused by RE2", "fix:"],
                ["spec.ingress.rules[1].http.methods", "fix: write 'GET'"],
            ],
        ),
        (
            "policy-contradictory-rules-are-refused",
            [["spec.ingress.rules[2]", "spec.ingress.rules[0]", "Deny", "Allow"]],
        ),
    ],
)
def test_refusal_names_every_problem_on_its_own_line(case: str, lines: list[list[str]]) -> None:
    response = answer(case)["response"]
    assert not response["allowed"]
    assert "patch" not in response
    assert response["status"]["code"] == 403
    message_lines = response["status"]["message"].splitlines()
    assert len(message_lines) == len(lines)
    for line, fragments in zip(message_lines, lines, strict=True):
        for fragment in fragments:
            assert fragment in line


def test_update_is_allowed_untouched_even_when_steer_annotations_change() -> None:
    review = request("pod-update-is-allowed-untouched")["request"]
    old, new = review["oldObject"]["metadata"], review["object"]["metadata"]
    assert old["annotations"] != new["annotations"]
    assert answer("pod-update-is-allowed-untouched")["response"] == {
        "uid": review["uid"],
        "allowed": True,
    }


@pytest.mark.parametrize(
    "case",
    [
        "pod-opted-out-with-namespace-permission-is-untouched",
        "pod-update-leaving-steering-alone-is-allowed",
    ],
)
def test_allowed_untouched_without_a_word(case: str) -> None:
    assert answer(case)["response"] == {"uid": request(case)["request"]["uid"], "allowed": True}


def test_host_network_pod_gets_no_gate_and_a_warning_saying_why() -> None:
    response = answer("pod-host-network-is-not-steered-and-warned")["response"]
    assert response["allowed"] and "patch" not in response
    [warning] = response["warnings"]
    for fragment in ("spec.hostNetwork", "no readiness gate", "HostNetwork", "steer.dev/dataplane"):
        assert fragment in warning


def test_permitted_opt_out_of_a_running_pod_is_allowed_with_a_warning() -> None:
    response = answer("pod-update-opt-out-with-namespace-permission-is-allowed-with-warning")[
        "response"
    ]
    assert response["allowed"] and "patch" not in response
    assert any("no longer steered" in w for w in response["warnings"])


def test_update_is_never_mutated() -> None:
    for case in POD_CASES:
        if request(case)["request"]["operation"] == "UPDATE":
            assert "patch" not in answer(case)["response"], case


def test_turning_steering_on_for_a_running_pod_warns_that_it_has_no_gate() -> None:
    review = request("pod-update-removing-opt-in-is-refused")
    req = review["request"]
    req["oldObject"], req["object"] = req["object"], req["oldObject"]
    req["object"]["spec"].pop("readinessGates")
    req["oldObject"]["spec"].pop("readinessGates")
    response = review_pod(review, NAMESPACE_LABELS["legacy"])["response"]
    assert response["allowed"] and "patch" not in response
    [warning] = response["warnings"]
    assert "no readiness gate" in warning and "delete the pod" in warning


def test_update_without_old_object_raises() -> None:
    review = request("pod-update-is-allowed-untouched")
    review["request"]["oldObject"] = None
    with pytest.raises(MalformedReview, match=r"request\.oldObject"):
        review_pod(review, NAMESPACE_LABELS["shop"])


# --- malformed input ------------------------------------------------------------------


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(review: dict[str, Any]) -> None:
        target = review
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _set(value: object, *path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(review: dict[str, Any]) -> None:
        target = review
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_drop("request"), "request is missing"),
        (_drop("request", "uid"), "request.uid"),
        (_set("", "request", "uid"), "request.uid"),
        (_set(None, "request", "object"), "request.object"),
        (_drop("request", "object"), "request.object"),
        (_set("admission.k8s.io/v1beta1", "apiVersion"), "admission.k8s.io/v1"),
        (_set("AdmissionReviewList", "kind"), "AdmissionReview"),
        (_set("PATCH", "request", "operation"), "request.operation"),
        (_set({"group": "", "version": "v1", "kind": "Service"}, "request", "kind"), "Service"),
        (_drop("request", "namespace"), "request.namespace"),
        (_set("not-a-map", "request", "object", "metadata", "annotations"), "annotations"),
    ],
)
def test_malformed_pod_review_raises(mutate: Callable[[dict[str, Any]], None], reason: str) -> None:
    review = request("pod-namespace-opted-in-gets-gate-and-defaults")
    mutate(review)
    with pytest.raises(MalformedReview, match=reason.replace(".", r"\.")):
        review_pod(review, NAMESPACE_LABELS["shop"])


@pytest.mark.parametrize("review", [[], "AdmissionReview", None])
def test_non_object_review_raises(review: Any) -> None:
    with pytest.raises(MalformedReview, match="JSON object"):
        review_policy(review)


def test_pod_review_sent_to_the_policy_webhook_raises() -> None:
    with pytest.raises(MalformedReview, match=r"admits HTTPPolicy\.steer\.dev"):
        review_policy(request("pod-namespace-opted-in-gets-gate-and-defaults"))


def test_subresource_requests_are_allowed_untouched() -> None:
    # What the scheduler sends if a configuration matched `pods/*`: refusing it, or
    # answering 400 under failurePolicy Fail, would stop every pod being scheduled.
    review = request("pod-namespace-opted-in-gets-gate-and-defaults")
    review["request"] |= {
        "subResource": "binding",
        "kind": {"group": "", "version": "v1", "kind": "Binding"},
        "name": "web-6d8f7c9b54-x7k2q",
        "object": {
            "kind": "Binding",
            "apiVersion": "v1",
            "metadata": {"name": "web-6d8f7c9b54-x7k2q", "namespace": "shop"},
            "target": {"kind": "Node", "name": "worker-2"},
        },
    }
    answer = review_pod(review, NAMESPACE_LABELS["shop"])["response"]
    assert answer == {"uid": review["request"]["uid"], "allowed": True}
