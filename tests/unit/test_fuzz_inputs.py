"""Fuzzing every surface that reads untrusted input, with hypothesis: seeded
(derandomized, so a run is repeatable) and bounded (the file runs in seconds).

Properties: the policy loader, the API-object converters and admission never raise
anything but their documented errors (they return errors instead), and the renderers
never raise on a policy the model accepted.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from steer.control import admission
from steer.model.enforce import resolve
from steer.model.load import PolicyError, parse_policies, validate_policy
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.render.iptables import KernelState, render_ruleset, restore_text
from steer.render.xds import render_resources
from steer.source.kubeobjects import PolicyValidator, pod_from_object, policy_status
from tests.samples import PODS

# Hypothesis caches what it learns in .hypothesis/ beside the tests; keep the checkout clean.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "steer-hypothesis"))
FUZZ = settings(
    derandomize=True,
    database=None,  # nothing written into the checkout; derandomized runs repeat anyway
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

POLICY_KEYS = [
    "apiVersion", "kind", "metadata", "name", "namespace", "spec", "podSelector",
    "matchLabels", "matchExpressions", "key", "operator", "values", "ingress", "egress",
    "defaultAction", "rules", "action", "from", "to", "cidr", "ports", "port", "endPort",
    "protocol", "http", "methods", "paths", "exact", "prefix", "regex", "hosts", "headers",
    "present", "negate", "status", "generation", "labels", "annotations", "resourceVersion",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "steer.dev/v1alpha1", "HTTPPolicy", "Allow", "Deny", "GET", "In", "Exists",
            "10.0.0.0/8", "/", "/a/../b", "a{1001}", r"\Z", "(?x)", "a*+", "x-foo\n",
            "ingress[0]", "*.example.com", "(" * 300, "a{4294967295}", "\ud800",
        ]
    ),
)  # fmt: skip
KEYS = st.one_of(st.sampled_from(POLICY_KEYS), st.text(max_size=6))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=12,
)


def assert_policy_or_errors(result: object) -> None:
    """A policy, or errors; and no error is the loader's last-resort catch of an exception
    (that would be a check that raised instead of refusing: a bug, contained)."""
    if isinstance(result, HTTPPolicy):
        return
    assert isinstance(result, list) and result
    assert all(isinstance(e, PolicyError) and isinstance(e.path, str) for e in result)
    unexpected = [e for e in result if e.message.startswith("could not be loaded")]
    assert not unexpected, unexpected


# --- the policy loader ---------------------------------------------------------------------

YAML_TOKENS = st.sampled_from(
    [
        "\n", "  ", "- ", ": ", "? ", "{", "}", "[", "]", ",", "&a ", "*a", "<<: ", "!!str ",
        "!!binary ", "!!python/object ", "---\n", "...\n", "'", '"', "\\u0000", "|\n", ">\n",
        "#", "%YAML 1.1\n", "2024-13-45", "0x1F", "1e999", ".inf", "~", "yes", "on",
        *POLICY_KEYS,
    ]
)  # fmt: skip


@FUZZ
@given(st.lists(st.one_of(YAML_TOKENS, st.text(max_size=4)), max_size=40).map("".join))
def test_loader_never_raises_on_yaml_ish_text(text: str) -> None:
    policies, errors = parse_policies(text, "fuzz.yaml")
    assert bool(policies) != bool(errors)
    assert all(e.source == "fuzz.yaml" for e in errors)


@FUZZ
@given(st.dictionaries(KEYS, JSON, max_size=6))
def test_loader_never_raises_on_structured_documents(document: dict[Any, Any]) -> None:
    assert_policy_or_errors(validate_policy(document, "fuzz"))
    try:
        text = yaml.safe_dump(document)
    except yaml.YAMLError:  # a lone surrogate, which YAML cannot write
        return
    policies, errors = parse_policies(text, "fuzz.yaml")
    assert bool(policies) != bool(errors)


def base_policy() -> dict[str, Any]:
    return {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": {
                "rules": [
                    {
                        "name": "r",
                        "from": [{"podSelector": {}}],
                        "ports": [{"port": 8080}],
                        "http": {
                            "methods": ["GET"],
                            "paths": [{"prefix": "/p/"}, {"regex": "/i/[0-9]+"}],
                            "hosts": ["web.example"],
                            "headers": [{"name": "x-a", "exact": "b"}],
                        },
                    }
                ]
            },
        },
    }


def lookup(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += paths_of(child, (*prefix, index))
    return out


# Strings that broke checks before (Python's `re` raising OverflowError or RecursionError,
# a `$` that matched before a newline), for the string fields of a valid policy.
HOSTILE = st.sampled_from(
    [
        "a{4294967295}", "(" * 1200 + "a" + ")" * 1200, "a{1001}", r"\Z", "(?x)a", "a*+",
        r"\u0041", "x-foo\n", "web\n", "ingress[0]", "\ud800", "", "[a-z]{200}", "a{,5}",
    ]
)  # fmt: skip


@FUZZ
@given(st.data())
def test_mutated_valid_policy_is_accepted_and_renders_or_is_refused(data: st.DataObject) -> None:
    """A valid policy with one value anywhere in it replaced by anything; half the time, a
    string value replaced by a hostile string."""
    document = base_policy()
    paths = paths_of(document)[1:]
    strings = [p for p in paths if isinstance(lookup(document, p), str)]
    hostile = data.draw(st.booleans())
    path = data.draw(st.sampled_from(strings if hostile else paths))
    lookup(document, path[:-1])[path[-1]] = data.draw(HOSTILE if hostile else JSON)
    result = validate_policy(document, "fuzz")
    assert_policy_or_errors(result)
    if isinstance(result, HTTPPolicy):
        render_all([result])


# --- API objects ---------------------------------------------------------------------------

LABELS = st.dictionaries(st.sampled_from(["app", "tier", "x"]), st.sampled_from(["web", "a"]))


@FUZZ
@given(
    name=st.text(max_size=8),
    namespace=st.sampled_from(["default", "shop", ""]),
    labels=LABELS,
    annotations=st.dictionaries(
        st.sampled_from(["steer.dev/inject", "steer.dev/dataplane", "other"]), st.text()
    ),
    ip=st.one_of(st.none(), st.ip_addresses().map(str), st.text(max_size=8)),
    phase=st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"]),
    host_network=st.booleans(),
    deleting=st.booleans(),
)
def test_pod_objects_become_a_pod_or_none(
    *,
    name: str,
    namespace: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    ip: str | None,
    phase: str,
    host_network: bool,
    deleting: bool,
) -> None:
    """Pods as the API server sends them (its schema holds), with any values in it."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    meta |= {"annotations": annotations} | ({"deletionTimestamp": "t"} if deleting else {})
    status: dict[str, Any] = {"phase": phase} | ({"podIP": ip} if ip is not None else {})
    obj = {"metadata": meta, "spec": {"hostNetwork": host_network}, "status": status}
    pod = pod_from_object(obj, {"shop": {"steer.dev/inject": "enabled"}})
    assert pod is None or isinstance(pod, Pod)


@FUZZ
@given(st.lists(st.one_of(JSON, st.dictionaries(KEYS, JSON, max_size=6)), max_size=3))
def test_policy_objects_are_accepted_or_refused_one_by_one(objects: list[Any]) -> None:
    for item in PolicyValidator().validate(objects):
        assert (item.policy is None) == bool(item.errors)
        status = policy_status(item, None, {}, 1, "2026-01-01T00:00:00Z")
        assert status["conditions"][0]["status"] == ("True" if item.policy else "False")


# --- AdmissionReviews ----------------------------------------------------------------------


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def review(obj: Any, kind: str, operation: Any) -> dict[str, Any]:
    group = "steer.dev" if kind == "HTTPPolicy" else ""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": "x"},
            "operation": operation,
            "userInfo": {},
            "namespace": "shop",
            "object": obj,
        },
    }


REVIEW_OBJECTS = st.one_of(
    JSON,
    st.dictionaries(KEYS, JSON, max_size=6),
    st.integers(0, 900).map(deep),
    st.builds(lambda p, d: p | {"spec": d}, st.just(base_policy()), st.integers(0, 900).map(deep)),
    st.builds(
        lambda a, b: {"metadata": {"annotations": a, "labels": b}, "spec": {}},
        JSON,
        JSON,
    ),
)


@FUZZ
@given(
    obj=REVIEW_OBJECTS,
    kind=st.sampled_from(["HTTPPolicy", "Pod"]),
    operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", "PATCH"]),
    wrap=st.booleans(),
)
def test_admission_answers_or_says_the_review_is_malformed(
    obj: Any, kind: str, operation: str, wrap: bool
) -> None:
    document = review(obj, kind, operation) if wrap else obj
    for decide in (
        admission.review_policy,
        lambda r: admission.review_pod(r, {"steer.dev/inject": "enabled"}),
    ):
        try:
            answer = decide(document)
        except admission.MalformedReview:
            continue
        assert isinstance(answer["response"]["allowed"], bool)


# --- the renderers -------------------------------------------------------------------------

SELECTORS = st.builds(lambda labels: {"matchLabels": labels}, LABELS)
PEERS = st.one_of(
    st.builds(lambda s: {"podSelector": s}, SELECTORS),
    st.sampled_from(["10.0.0.0/8", "10.244.0.3/32", "0.0.0.0/0", "169.254.0.0/16"]).map(
        lambda c: {"cidr": c}
    ),
)
PORTS = st.one_of(
    st.builds(lambda p: {"port": p}, st.integers(1, 65535)),
    st.builds(lambda p, n: {"port": p, "endPort": p + n}, st.integers(1, 60000), st.integers(0, 9)),
)
SEGMENT = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=6)
PATHS = st.one_of(
    st.builds(lambda s: {"prefix": "/" + "/".join(s)}, st.lists(SEGMENT, max_size=3)),
    st.builds(lambda s: {"exact": "/" + "/".join(s)}, st.lists(SEGMENT, max_size=3)),
    st.sampled_from(["/items/[0-9]+", "^/v[0-9]+/.*$", "(?i)/api/.*", "/a|/b"]).map(
        lambda r: {"regex": r}
    ),
)
HEADERS = st.one_of(
    st.builds(lambda n, v: {"name": n, "exact": v}, SEGMENT, st.text(max_size=6)),
    st.builds(lambda n, v: {"name": n, "prefix": v}, SEGMENT, SEGMENT),
    st.builds(lambda n: {"name": n, "regex": "[a-f0-9]+"}, SEGMENT),
    st.builds(lambda n, g: {"name": n, "present": True, "negate": g}, SEGMENT, st.booleans()),
)
HOSTS = st.one_of(
    st.builds(lambda a, b: f"{a}.{b}", SEGMENT.filter(str.isalnum), st.just("example")),
    st.just("*.example.com"),
)
HTTP = st.fixed_dictionaries(
    {},
    optional={
        "methods": st.lists(st.sampled_from(["GET", "POST", "HEAD"]), min_size=1, max_size=2),
        "paths": st.lists(PATHS, min_size=1, max_size=3),
        "hosts": st.lists(HOSTS, min_size=1, max_size=2),
        "headers": st.lists(HEADERS, min_size=1, max_size=2),
    },
)


def rules(peers_key: str) -> st.SearchStrategy[list[dict[str, Any]]]:
    rule = st.fixed_dictionaries(
        {"action": st.sampled_from(["Allow", "Deny"])},
        optional={
            peers_key: st.lists(PEERS, min_size=1, max_size=2),
            "ports": st.lists(PORTS, min_size=1, max_size=2),
            "http": HTTP,
        },
    )
    return st.lists(rule, max_size=4).map(
        lambda rs: [r | ({"name": f"r{i}"} if i % 2 else {}) for i, r in enumerate(rs)]
    )


def section(peers_key: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"defaultAction": st.sampled_from(["Allow", "Deny"]), "rules": rules(peers_key)}
    )


POLICY_DOCS = st.builds(
    lambda name, selector, sections: {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": selector} | sections,
    },
    SEGMENT.filter(lambda s: s[0].isalnum() and s[-1].isalnum() and "_" not in s),
    SELECTORS,
    st.fixed_dictionaries(
        {}, optional={"ingress": section("from"), "egress": section("to")}
    ).filter(bool),
)


def render_all(policies: list[HTTPPolicy]) -> None:
    enforcement = resolve(policies, PODS)
    for message in render_resources(enforcement).values():
        for resource in message.values():
            resource.SerializeToString()
    restore_text(render_ruleset(enforcement), KernelState())


@FUZZ
@given(st.lists(POLICY_DOCS, min_size=1, max_size=3, unique_by=lambda d: d["metadata"]["name"]))
def test_renderers_never_raise_on_accepted_policies(documents: list[dict[str, Any]]) -> None:
    policies = []
    for document in documents:
        result = validate_policy(document, "fuzz")
        assert isinstance(result, HTTPPolicy), result  # the strategy builds valid ones
        policies.append(result)
    render_all(policies)
