"""mode: Audit: the rule enforces nothing (the datapath, explain, and Envoy's enforced RBAC
leave it out), and Envoy evaluates it in the shadow rules whose verdict `steer observe`
reports as `audit`. Against real Envoy: tests/e2e/test_observe.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from google.protobuf import struct_pb2

from steer.constants import VERDICT_ALLOW, VERDICT_DENY, VERDICT_L7
from steer.model.enforce import Enforcement, decide_flow, resolve
from steer.model.explain import HTTPRequest, explain, l4_audit
from steer.model.load import parse_policies
from steer.model.policy import Action, HTTPPolicy, Mode
from steer.node.observe import NodeView, http_event
from steer.render.xds import (
    INGRESS_ALLOW,
    INGRESS_DENY,
    RBAC_METADATA,
    ROUTE_TYPE,
    render_resources,
    route_name,
)
from tests.samples import CLIENT, PODS, WEB, policy_yaml, sample_policies
from tests.unit.test_observe_events import entry


def parsed(spec: str, name: str) -> list[HTTPPolicy]:
    """The policy of `spec`, which must load without an error."""
    policies, errors = parse_policies(policy_yaml(spec, name=name), f"{name}.yaml")
    assert errors == []
    return policies


def others() -> list[HTTPPolicy]:
    """The sample policies but web's, which each test replaces."""
    return [p for p in sample_policies() if p.metadata.name != "web"]


AUDITED = """spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    defaultAction: Allow
    rules:
      - {name: would-block-admin, action: Deny, mode: Audit, http: {paths: [{prefix: /admin}]}}
"""


def enforcement() -> Enforcement:
    return resolve([*others(), *parsed(AUDITED, "audit")], PODS)


def test_an_audited_rule_still_sends_the_flow_to_envoy_and_enforces_nothing() -> None:
    resolved = enforcement()
    assert decide_flow(resolved, IPv4Address(CLIENT.ip), IPv4Address(WEB.ip), 8080).verdict == (
        VERDICT_L7
    )
    result = explain(
        resolved, IPv4Address(CLIENT.ip), IPv4Address(WEB.ip), 8080, HTTPRequest(path="/admin")
    )
    assert (result.http, result.status) == ("allowed", 200)


def test_envoy_evaluates_it_in_the_shadow_rules_only() -> None:
    routes = render_resources(enforcement())[ROUTE_TYPE]
    route = routes[route_name(IPv4Network(f"{WEB.ip}/32"))]
    per_route = rbac_filter_pb2.RBACPerRoute()
    route.virtual_hosts[0].typed_per_filter_config[INGRESS_DENY].Unpack(per_route)
    enforced = set(per_route.rbac.rules.policies)
    shadow = set(per_route.rbac.shadow_rules.policies)
    audited = "default/web:default/audit/0/would-block-admin"
    assert audited not in enforced
    assert shadow == enforced | {audited}
    assert per_route.rbac.shadow_rules_stat_prefix == "audit_ingress_"


def test_a_shadow_denial_of_an_allowed_request_is_an_audit_event() -> None:
    message = entry("/admin", 200, "via_upstream")
    shadow = struct_pb2.Struct()
    shadow.update(
        {
            "audit_ingress_shadow_engine_result": "denied",
            "audit_ingress_shadow_effective_policy_id": (
                "default/web:default/audit/0/would-block-admin"
            ),
        }
    )
    message.common_properties.metadata.filter_metadata[RBAC_METADATA].CopyFrom(shadow)
    event = http_event(message, NodeView())
    assert (event["verdict"], event["policy"], event["rule"], event["status"]) == (
        "audit",
        "default/audit",
        "would-block-admin",
        200,
    )


L4_AUDITED = """spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    defaultAction: Allow
    rules:
      - {name: would-close-8080, action: Deny, mode: Audit, ports: [{port: 8080}]}
"""


def test_an_audited_l4_rule_reaches_no_datapath_and_names_the_flows_it_would_deny() -> None:
    resolved = resolve([*others(), *parsed(L4_AUDITED, "audit")], PODS)
    client, web = IPv4Address(CLIENT.ip), IPv4Address(WEB.ip)
    side = resolved.ingress[web]
    assert [r.name for r in side.audited] == ["would-close-8080"]
    assert all(not r.audit for r in side.rules)
    assert l4_audit(resolved, client, web, 8080) == ("default/audit", "would-close-8080")
    assert l4_audit(resolved, client, web, 9090) is None
    # Enforced as if the rule were not there: the same verdicts and Envoy resources.
    bare = L4_AUDITED.replace(
        "      - {name: would-close-8080, action: Deny, mode: Audit, ports: [{port: 8080}]}\n", ""
    ).replace("rules:", "rules: []")
    without = resolve([*others(), *parsed(bare, "audit")], PODS)
    for port in (8080, 9090):
        assert decide_flow(resolved, client, web, port) == decide_flow(without, client, web, port)
    assert render_resources(resolved) == render_resources(without)


STAGED = """spec:
  podSelector: {matchLabels: {app: web}}
  mode: Audit
  ingress:
    defaultAction: Deny
    rules:
      - {name: public, ports: [{port: 8080}], http: {paths: [{prefix: /public}]}}
      - {name: no-admin, action: Deny, ports: [{port: 8080}], http: {paths: [{prefix: /admin}]}}
      - {name: metrics, ports: [{port: 9090}]}
"""


def staged() -> tuple[Enforcement, Enforcement]:
    """web's ingress under the staged policy, and under the same policy enforced."""
    (policy,) = parsed(STAGED, "staged")
    return resolve([*others(), policy], PODS), resolve([*others(), policy.enforced()], PODS)


def test_a_policy_of_mode_audit_restricts_nothing() -> None:
    resolved, _ = staged()
    client, web = IPv4Address(CLIENT.ip), IPv4Address(WEB.ip)
    side = resolved.ingress[web]
    assert side.default_action is Action.ALLOW
    assert side.default_policy_id == 0  # no policy in force decides web's ingress
    assert all(rule.audit for rule in (*side.rules, *side.audited))
    for path in ("/public/a", "/admin/a", "/other"):
        result = explain(resolved, client, web, 8080, HTTPRequest(path=path))
        assert result.status == 200, path
    assert decide_flow(resolved, client, web, 7000).verdict != VERDICT_DENY


def test_its_as_if_verdicts_are_those_of_the_policy_enforced() -> None:
    resolved, enforced = staged()
    assert resolved.as_if is not None
    client, web = IPv4Address(CLIENT.ip), IPv4Address(WEB.ip)
    for port in (7000, 8080, 9090):
        assert decide_flow(resolved.as_if, client, web, port) == decide_flow(
            enforced, client, web, port
        )
    for path in ("/public/a", "/admin/a", "/other"):
        request = HTTPRequest(path=path)
        assert explain(resolved.as_if, client, web, 8080, request) == explain(
            enforced, client, web, 8080, request
        )
    # A flow the policy would refuse at L4 (no rule covers port 7000): its default.
    assert l4_audit(resolved, client, web, 7000) == ("default/staged", "default-deny")
    assert l4_audit(resolved, client, web, 9090) is None


def test_envoy_evaluates_the_allows_as_if_the_policy_were_enforced() -> None:
    resolved, _ = staged()
    route = render_resources(resolved)[ROUTE_TYPE][route_name(IPv4Network(f"{WEB.ip}/32"))]
    filters = route.virtual_hosts[0].typed_per_filter_config

    def rbac(name: str) -> rbac_filter_pb2.RBAC:
        per_route = rbac_filter_pb2.RBACPerRoute()
        filters[name].Unpack(per_route)
        return per_route.rbac

    allow = rbac(INGRESS_ALLOW)
    # Enforced: everything (the default of a side no policy in force restricts).
    assert set(allow.rules.policies) == {"default/web:default-allow"}
    # As if enforced: only the staged allows, no default.
    assert set(allow.shadow_rules.policies) == {
        "default/web:default/staged/0/public",
        "default/web:default/staged/2/metrics",
    }
    assert allow.shadow_rules_stat_prefix == "audit_ingress_allow_"
    deny = rbac(INGRESS_DENY)
    assert set(deny.rules.policies) == set()
    assert set(deny.shadow_rules.policies) == {"default/web:default/staged/1/no-admin"}


def test_a_request_no_staged_allow_covers_is_an_audit_event_naming_the_default() -> None:
    resolved, _ = staged()
    message = entry("/other", 200, "via_upstream")
    shadow = struct_pb2.Struct()
    shadow.update({"audit_ingress_allow_shadow_engine_result": "denied"})
    message.common_properties.metadata.filter_metadata[RBAC_METADATA].CopyFrom(shadow)
    view = NodeView({p.ip: (p, "ebpf") for p in PODS}, resolved)
    event = http_event(message, view)
    assert (event["verdict"], event["policy"], event["rule"], event["status"]) == (
        "audit",
        "default/staged",
        "default-deny",
        200,
    )


def test_enforced_copies_keep_everything_but_the_modes() -> None:
    (policy,) = parsed(STAGED, "staged")
    enforced = policy.enforced()
    assert policy.audits and not enforced.audits
    assert enforced.spec.mode is Mode.ENFORCE
    assert enforced.model_dump(exclude={"spec": {"mode"}}) == policy.model_dump(
        exclude={"spec": {"mode"}}
    )


STAGED_OVER_DENY = """spec:
  podSelector: {matchLabels: {app: web}}
  mode: Audit
  ingress:
    defaultAction: Allow
    rules:
      - {name: everything-via-envoy, http: {paths: [{prefix: /}]}}
"""
ENFORCED_DENY = """spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    defaultAction: Deny
    rules:
      - {name: db, ports: [{port: 5432}]}
"""


def test_a_staged_http_rule_never_turns_an_enforced_deny_into_l7() -> None:
    """Replays a review finding: a staged policy's HTTP rule sat in the L7 class, which the
    datapath evaluates before the default, so under an enforced default Deny the flows it
    matched went to Envoy (and past it with an exclusion) instead of being refused."""
    staged, enforced = parsed(STAGED_OVER_DENY, "staged"), parsed(ENFORCED_DENY, "enforced")
    client, web = IPv4Address(CLIENT.ip), IPv4Address(WEB.ip)
    with_staged = resolve([*others(), *staged, *enforced], PODS)
    without = resolve([*others(), *enforced], PODS)
    for port in (5432, 7000, 8080):
        assert decide_flow(with_staged, client, web, port) == decide_flow(
            without, client, web, port
        ), port
    assert decide_flow(with_staged, client, web, 7000).verdict == VERDICT_DENY
    # Still in Envoy's shadow rules, for flows that reach Envoy for rules in force.
    side = with_staged.ingress[web]
    assert [r.name for r in side.audited] == ["everything-via-envoy"]


def test_a_staged_http_rule_turns_an_allowed_flow_into_l7_and_nothing_else() -> None:
    client, web = IPv4Address(CLIENT.ip), IPv4Address(WEB.ip)
    resolved = resolve([*others(), *parsed(STAGED_OVER_DENY, "staged")], PODS)
    without = resolve(others(), PODS)
    for port in (5432, 7000, 8080):
        before = decide_flow(without, client, web, port).verdict
        after = decide_flow(resolved, client, web, port).verdict
        assert (before, after) in {(VERDICT_L7, VERDICT_L7), (VERDICT_ALLOW, VERDICT_L7)}, port
