"""mode: Audit: the rule enforces nothing (the datapath, explain, and Envoy's enforced RBAC
leave it out), and Envoy evaluates it in the shadow rules whose verdict `steer observe`
reports as `audit`. Against real Envoy: tests/e2e/test_observe.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from google.protobuf import struct_pb2

from steer.constants import VERDICT_L7
from steer.model.enforce import Enforcement, decide_flow, resolve
from steer.model.explain import HTTPRequest, explain, l4_audit
from steer.model.load import parse_policies
from steer.node.observe import NodeView, http_event
from steer.render.xds import (
    INGRESS_DENY,
    RBAC_METADATA,
    ROUTE_TYPE,
    render_resources,
    route_name,
)
from tests.samples import CLIENT, PODS, WEB, policy_yaml, sample_policies
from tests.unit.test_observe_events import entry

AUDITED = """spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    defaultAction: Allow
    rules:
      - {name: would-block-admin, action: Deny, mode: Audit, http: {paths: [{prefix: /admin}]}}
"""


def enforcement() -> Enforcement:
    policies, errors = parse_policies(policy_yaml(AUDITED, name="audit"), "audit.yaml")
    assert errors == []
    others = [p for p in sample_policies() if p.metadata.name != "web"]
    return resolve([*others, *policies], PODS)


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
    policies, errors = parse_policies(policy_yaml(L4_AUDITED, name="audit"), "audit.yaml")
    assert errors == []
    others = [p for p in sample_policies() if p.metadata.name != "web"]
    resolved = resolve([*others, *policies], PODS)
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
    unaudited, errors = parse_policies(policy_yaml(bare, name="audit"), "audit.yaml")
    assert errors == []
    without = resolve([*others, *unaudited], PODS)
    for port in (8080, 9090):
        assert decide_flow(resolved, client, web, port) == decide_flow(without, client, web, port)
    assert render_resources(resolved) == render_resources(without)
