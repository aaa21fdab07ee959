"""HTTPPolicy loading: good input loads; bad input is refused with the field path and a fix."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from steer.model.load import PolicyError, parse_policies
from steer.model.policy import Action, HTTPPolicy
from tests.samples import policy_yaml, sample_policies

SOURCE = "policies/web.yaml"
RULE = "spec.ingress.rules[0]"
HTTP = f"{RULE}.http"


def policy_doc(name: str = "p", **spec: Any) -> dict[str, Any]:
    """A valid policy document; `spec` keys replace the default spec's keys."""
    return {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": {}} | spec,
    }


def with_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return policy_doc(ingress={"rules": [rule]})


def with_http(http: dict[str, Any]) -> dict[str, Any]:
    return with_rule({"http": http})


def dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def load_one(text: str) -> HTTPPolicy:
    policies, errors = parse_policies(text, SOURCE)
    assert errors == []
    [policy] = policies
    return policy


def rejected(text: str) -> list[PolicyError]:
    """The errors for `text`, checking that nothing from the file loaded."""
    policies, errors = parse_policies(text, SOURCE)
    assert policies == []
    assert errors, "expected the file to be rejected"
    assert all(e.source == SOURCE for e in errors)
    return errors


def only_error(text: str) -> PolicyError:
    [error] = rejected(text)
    return error


def assert_actionable(error: PolicyError, path: str, *fragments: str) -> None:
    assert error.path == path
    assert has_fix(error)
    for fragment in fragments:
        assert fragment in error.message


def has_fix(error: PolicyError) -> bool:
    """The message tells the operator what to do (a word "fix", not e.g. "prefix")."""
    return re.search(r"\bfix\b", error.message) is not None


# --- good input ---------------------------------------------------------------------------


def test_shipped_samples_load() -> None:
    assert {p.key for p in sample_policies()} == {
        "default/api",
        "default/client-egress",
        "default/web",
    }


def test_full_policy_loads_with_normalised_values() -> None:
    policy = load_one(
        dump(
            policy_doc(
                ingress={
                    "defaultAction": "Allow",
                    "rules": [
                        {
                            "name": "reads",
                            "from": [
                                {"cidr": "10.1.0.0/16"},
                                {"podSelector": {"matchLabels": {"app": "client"}}},
                            ],
                            "ports": [{"port": 8000, "endPort": 8100}],
                            "http": {
                                "methods": ["GET", "HEAD"],
                                "paths": [{"prefix": "/public/"}, {"regex": "^/v[0-9]+/.*$"}],
                                "hosts": ["API.Example.com", "*.example.com"],
                                "headers": [{"name": "x-debug", "present": True, "negate": True}],
                            },
                        }
                    ],
                },
                egress={"rules": [{"action": "Deny", "to": [{"cidr": "169.254.0.0/16"}]}]},
            )
        )
    )
    assert policy.key == "default/p"
    assert policy.spec.ingress is not None
    assert policy.spec.ingress.default_action is Action.ALLOW
    [rule] = policy.spec.ingress.rules
    assert rule.ports is not None
    assert rule.ports[0].range == (8000, 8100)
    assert rule.http is not None
    assert rule.http.hosts == ("api.example.com", "*.example.com")
    assert policy.spec.egress is not None
    assert policy.spec.egress.default_action is Action.DENY


def test_sections_default_to_deny() -> None:
    policy = load_one(policy_yaml("spec:\n  podSelector: {}\n  ingress: {}\n"))
    assert policy.spec.ingress is not None
    assert policy.spec.ingress.default_action is Action.DENY
    assert policy.spec.egress is None


def test_kubectl_output_with_status_and_server_metadata_loads() -> None:
    doc = policy_doc()
    doc["metadata"] |= {"uid": "1234", "resourceVersion": "7", "generation": 3}
    doc["status"] = {"observedGeneration": 3}
    assert load_one(dump(doc)).metadata.generation == 3


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param({"ports": [{"port": 1}, {"port": 65535}]}, id="port-bounds"),
        pytest.param({"ports": [{"port": 80, "endPort": 80}]}, id="endPort-equals-port"),
        pytest.param({"from": [{"cidr": "0.0.0.0/0"}]}, id="cidr-everything"),
        pytest.param({"from": [{"cidr": "10.0.0.7/32"}]}, id="cidr-host"),
        pytest.param({"from": [{"podSelector": {}}]}, id="empty-peer-selector"),
        pytest.param({"http": {"methods": ["PATCH", "OPTIONS"]}}, id="methods"),
        pytest.param({"http": {"paths": [{"exact": "/"}]}}, id="root-path"),
        pytest.param({"http": {"paths": [{"exact": "/a.b/c..d/.e"}]}}, id="dots-in-names"),
        pytest.param({"http": {"headers": [{"name": "x-id", "regex": "^[a-f0-9]+$"}]}}, id="hdr"),
    ],
)
def test_valid_rule_loads(rule: dict[str, Any]) -> None:
    load_one(dump(with_rule(rule)))


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"])
def test_empty_file_is_an_error_so_an_edit_in_progress_never_drops_policy(text: str) -> None:
    assert_actionable(only_error(text), "", "delete the file")


@pytest.mark.parametrize("matcher", [{"exact": "blue"}, {"prefix": "b"}, {"regex": "b.*"}])
def test_negated_value_match_is_refused_because_repeats_escape_it(
    matcher: dict[str, str],
) -> None:
    header = {"name": "x-team", "negate": True} | matcher
    error = only_error(dump(with_http({"headers": [header]})))
    assert_actionable(error, f"{HTTP}.headers[0]", "value by value")


# --- malformed YAML and document shape -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("kind: HTTPPolicy\nmetadata:\n  name: p\n   namespace: x\n", "line 4, column 13"),
        ("kind: HTTPPolicy\nmetadata: {name: p\nspec: {}\n", "line 3, column 5"),
        ('kind: "unterminated\n', "line 2, column 1"),
    ],
    ids=["bad-indent", "unclosed-flow-mapping", "unterminated-string"],
)
def test_malformed_yaml_names_line_and_column(text: str, where: str) -> None:
    assert_actionable(only_error(text), where, "malformed YAML")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("just a string\n", id="scalar"),
        pytest.param(dump(policy_doc()) + "---\n- a list\n", id="list-in-multi-document"),
    ],
)
def test_non_mapping_document_is_refused_with_fix(text: str) -> None:
    assert has_fix(only_error(text))


# --- field errors: path and fix ------------------------------------------------------------------


def _top(**changes: Any) -> dict[str, Any]:
    return policy_doc() | changes


def _spec_without_selector() -> dict[str, Any]:
    doc = policy_doc()
    del doc["spec"]["podSelector"]
    return doc


@pytest.mark.parametrize(
    ("doc", "path", "hint"),
    [
        pytest.param(_top(spce={}), "spce", "remove it", id="unknown-top-level-field"),
        pytest.param(
            policy_doc(podSelecter={}), "spec.podSelecter", "remove it", id="unknown-spec"
        ),
        pytest.param(
            with_rule({"portz": [{"port": 80}]}), f"{RULE}.portz", "remove it", id="unknown-in-rule"
        ),
        pytest.param(
            policy_doc(egress={"rules": [{"from": []}]}),
            "spec.egress.rules[0].from",
            "remove it",
            id="ingress-key-in-egress-rule",
        ),
        pytest.param(_spec_without_selector(), "spec.podSelector", "add it", id="no-podSelector"),
        pytest.param(_top(apiVersion="steer.dev/v1"), "apiVersion", "allowed", id="apiVersion"),
        pytest.param(_top(kind="NetworkPolicy"), "kind", "allowed", id="kind"),
        pytest.param(policy_doc(ingress=None), "spec", "add one", id="neither-ingress-nor-egress"),
        pytest.param(
            with_rule({"action": "deny"}), f"{RULE}.action", "allowed", id="lowercase-action"
        ),
        pytest.param(
            _top(metadata={"name": "Web_Policy"}), "metadata.name", "lowercase", id="bad-name"
        ),
        pytest.param(
            policy_doc(podSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
            "spec.podSelector.matchExpressions[0]",
            "at least one",
            id="In-without-values",
        ),
    ],
)
def test_bad_structure_names_field_and_fix(doc: dict[str, Any], path: str, hint: str) -> None:
    assert_actionable(only_error(dump(doc)), path, hint)


@pytest.mark.parametrize(
    ("cidr", "hint"),
    [
        ("10.0.0.0/33", "10.0.0.0/8"),
        ("10.0.0.1/8", "no bits set past the prefix"),
        ("fd00::/8", "IPv4 only"),
        ("not-a-cidr", "10.0.0.0/8"),
    ],
)
def test_invalid_cidr_is_refused(cidr: str, hint: str) -> None:
    error = only_error(dump(with_rule({"from": [{"cidr": cidr}]})))
    assert_actionable(error, f"{RULE}.from[0].cidr", hint)


@pytest.mark.parametrize(
    ("port", "path", "hint"),
    [
        ({"port": 0}, f"{RULE}.ports[0].port", "1-65535"),
        ({"port": 70000}, f"{RULE}.ports[0].port", "1-65535"),
        ({"port": 80, "endPort": 70000}, f"{RULE}.ports[0].endPort", "1-65535"),
        ({"port": 90, "endPort": 80}, f"{RULE}.ports[0]", "endPort >= port"),
        ({"port": 80, "protocol": "UDP"}, f"{RULE}.ports[0].protocol", "allowed"),
        ({"port": "http"}, f"{RULE}.ports[0].port", "whole number"),
    ],
    ids=["zero", "too-high", "endPort-too-high", "endPort-below-port", "udp", "named-port"],
)
def test_invalid_port_is_refused(port: dict[str, Any], path: str, hint: str) -> None:
    assert_actionable(only_error(dump(with_rule({"ports": [port]}))), path, hint)


def test_fractional_port_is_refused_with_fix() -> None:
    error = only_error(dump(with_rule({"ports": [{"port": 80.5}]})))
    assert_actionable(error, f"{RULE}.ports[0].port")


@pytest.mark.parametrize(
    ("method", "hint"),
    [("get", "write 'GET'"), ("Post", "write 'POST'"), ("FOO", "GET, HEAD")],
)
def test_unknown_method_is_refused(method: str, hint: str) -> None:
    error = only_error(dump(with_http({"methods": ["GET", method]})))
    assert_actionable(error, f"{HTTP}.methods", repr(method), hint)


@pytest.mark.parametrize("field", ["paths", "headers"])
@pytest.mark.parametrize(
    ("regex", "hint"),
    [
        ("(", "refused by RE2 (missing )"),
        ("^/(?!admin)", "RE2"),
        ("(?<=/api)/x", "RE2"),
        (r"(a)\1", "RE2"),
    ],
    ids=["unbalanced", "negative-lookahead", "lookbehind", "backreference"],
)
def test_bad_regex_is_refused(field: str, regex: str, hint: str) -> None:
    entry = {"regex": regex} if field == "paths" else {"name": "x-a", "regex": regex}
    assert_actionable(only_error(dump(with_http({field: [entry]}))), f"{HTTP}.{field}[0]", hint)


@pytest.mark.parametrize("kind", ["exact", "prefix"])
@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("/a/../b", "not normalised"),
        ("/a/./b", "not normalised"),
        ("/a/..", "not normalised"),
        ("//a", "not normalised"),
        ("/a//b", "not normalised"),
        ("/a/%2fb", "decoded"),
        ("/a/%2Fb", "decoded"),
        ("/a/%2e%2e/b", "decoded"),
        ("/a/%5cb", "decoded"),
        ("admin", "write '/admin'"),
        ("/a?q=1", "query"),
        ("/a#top", "query or fragment"),
    ],
)
def test_non_normalised_path_is_refused(kind: str, path: str, hint: str) -> None:
    error = only_error(dump(with_http({"paths": [{kind: path}]})))
    assert_actionable(error, f"{HTTP}.paths[0]", hint)


def test_path_with_backslash_is_refused() -> None:
    error = only_error(dump(with_http({"paths": [{"prefix": "/a\\b"}]})))
    assert_actionable(error, f"{HTTP}.paths[0]", "normalised")


@pytest.mark.parametrize(
    "path",
    [pytest.param({}, id="no-matcher"), pytest.param({"exact": "/a", "prefix": "/a"}, id="two")],
)
def test_path_match_needs_exactly_one_matcher(path: dict[str, str]) -> None:
    error = only_error(dump(with_http({"paths": [path]})))
    assert_actionable(error, f"{HTTP}.paths[0]", "exactly one")


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        ("api.example.com:8080", "name only"),
        ("-api.example.com", "'*.example.com'"),
        ("api.*.com", "'*.example.com'"),
        ("http://api.example.com", "name only"),
    ],
)
def test_invalid_host_is_refused(host: str, hint: str) -> None:
    assert_actionable(only_error(dump(with_http({"hosts": [host]}))), f"{HTTP}.hosts", hint)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("X-Request-Id", "write 'x-request-id'"), (":authority", "`hosts`"), (":path", "`paths`")],
)
def test_uppercase_or_pseudo_header_name_is_refused(name: str, hint: str) -> None:
    error = only_error(dump(with_http({"headers": [{"name": name, "exact": "1"}]})))
    assert_actionable(error, f"{HTTP}.headers[0].name", hint)


def test_header_name_with_forbidden_characters_is_refused_with_fix() -> None:
    error = only_error(dump(with_http({"headers": [{"name": "x a", "exact": "1"}]})))
    assert_actionable(error, f"{HTTP}.headers[0].name")


def test_header_present_false_is_refused() -> None:
    error = only_error(dump(with_http({"headers": [{"name": "x-a", "present": False}]})))
    assert_actionable(error, f"{HTTP}.headers[0]", "present: true, negate: true")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"name": "x-a", "exact": "1", "prefix": "1"}, id="two-matchers"),
        pytest.param({"name": "x-a"}, id="no-matcher"),
    ],
)
def test_header_needs_exactly_one_matcher(header: dict[str, Any]) -> None:
    error = only_error(dump(with_http({"headers": [header]})))
    assert_actionable(error, f"{HTTP}.headers[0]", "exactly one")


@pytest.mark.parametrize(
    "peer",
    [
        pytest.param({"cidr": "10.0.0.0/8", "podSelector": {}}, id="both"),
        pytest.param({}, id="neither"),
    ],
)
def test_peer_needs_exactly_one_of_cidr_or_selector(peer: dict[str, Any]) -> None:
    error = only_error(dump(with_rule({"from": [peer]})))
    assert_actionable(error, f"{RULE}.from[0]", "exactly one")


def test_repeated_mapping_key_is_refused() -> None:
    text = policy_yaml(
        "spec:\n  podSelector: {}\n  ingress:\n    rules:\n"
        "      - action: Deny\n        action: Allow\n"
    )
    assert has_fix(only_error(text))


# --- multi-document files ---------------------------------------------------------------------


def test_multi_document_file_loads_every_policy() -> None:
    policies, errors = parse_policies(dump(policy_doc("a"), policy_doc("b")), SOURCE)
    assert errors == []
    assert [p.key for p in policies] == ["default/a", "default/b"]


def test_one_bad_document_rejects_the_whole_file() -> None:
    bad = with_rule({"ports": [{"port": 0}]})
    error = only_error(dump(policy_doc("a"), bad, policy_doc("c")))
    assert_actionable(error, f"document 1: {RULE}.ports[0].port", "1-65535")


def test_errors_of_every_bad_document_are_reported() -> None:
    errors = rejected(dump(with_rule({"portz": []}), policy_doc(ingress=None)))
    assert [e.path for e in errors] == [f"document 0: {RULE}.portz", "document 1: spec"]


def test_duplicate_policy_names_in_one_file_are_refused() -> None:
    error = only_error(dump(policy_doc("a"), policy_doc("a", egress={})))
    assert_actionable(error, "metadata.name", "default/a", "defined twice", "rename")


def test_same_name_in_different_namespaces_is_not_a_duplicate() -> None:
    other = policy_doc("a")
    other["metadata"]["namespace"] = "other"
    policies, errors = parse_policies(dump(policy_doc("a"), other), SOURCE)
    assert errors == []
    assert [p.key for p in policies] == ["default/a", "other/a"]


def test_error_string_names_source_and_path() -> None:
    error = only_error(dump(with_rule({"portz": []})))
    assert str(error).startswith(f"{SOURCE}: {RULE}.portz: ")


@pytest.mark.parametrize("field", ["from", "ports"])
def test_empty_list_is_refused_rather_than_matching_nothing(field: str) -> None:
    error = only_error(dump(with_rule({field: []})))
    assert_actionable(error, f"{RULE}.{field}", "omit the field")


@pytest.mark.parametrize("port", [True, "80"])
def test_port_must_be_a_number_not_a_yaml_boolean_or_string(port: object) -> None:
    error = only_error(dump(with_rule({"ports": [{"port": port}]})))
    assert error.path == f"{RULE}.ports[0].port"
    assert has_fix(error)


def test_misspelt_metadata_field_is_refused() -> None:
    doc = policy_doc()
    doc["metadata"]["namespce"] = "prod"
    assert_actionable(only_error(dump(doc)), "metadata.namespce", "remove it")


def test_metadata_as_the_api_server_returns_it_loads() -> None:
    doc = policy_doc()
    doc["metadata"] |= {
        "uid": "0b7c",
        "resourceVersion": "42",
        "creationTimestamp": "2026-11-26T10:00:00Z",
        "managedFields": [{"manager": "kubectl"}],
        "labels": {"team": "web"},
    }
    assert load_one(dump(doc)).metadata.labels == {"team": "web"}


@pytest.mark.parametrize("service", ["Web", "web/api/x", "web.default", "-web", "a" * 64, ""])
def test_a_service_that_is_not_a_name_is_refused_with_fix(service: str) -> None:
    error = only_error(dump(with_http({"services": [service]})))
    assert_actionable(error, f"{HTTP}.services", "'namespace/name'")


@pytest.mark.parametrize("service", ["web", "other/web"])
def test_a_service_by_name_or_namespace_and_name_loads(service: str) -> None:
    policy = load_one(dump(with_http({"services": [service]})))
    assert policy.spec.ingress is not None
    http = policy.spec.ingress.rules[0].http
    assert http is not None and http.services == (service,)


@pytest.mark.parametrize("match", [{"http": {}}, {"ports": [{"port": 80}]}], ids=["http", "l4"])
def test_an_audited_deny_loads(match: dict[str, Any]) -> None:
    policy = load_one(dump(with_rule({"action": "Deny", "mode": "Audit", **match})))
    assert policy.spec.ingress is not None
    assert policy.spec.ingress.rules[0].mode == "Audit"


@pytest.mark.parametrize(
    ("rule", "hint"),
    [
        ({"action": "Allow", "mode": "Audit", "http": {}}, "action: Deny"),
        ({"action": "Deny", "mode": "audit", "http": {}}, ""),
    ],
)
def test_an_audit_of_what_is_no_denial_is_refused_with_fix(rule: dict[str, Any], hint: str) -> None:
    error = only_error(dump(with_rule(rule)))
    assert error.path.startswith(RULE)
    assert has_fix(error)
    assert hint in error.message
