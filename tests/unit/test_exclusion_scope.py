"""A pod's exclusions may only weaken its own namespace's policy, on both datapaths'
encodings; and rendered RBAC keys are unique by construction."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from steer.constants import (
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    LABEL_ALLOW_EXCLUSIONS,
    VERDICT_ALLOW,
    VERDICT_L7,
)
from steer.model.enforce import resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.render.bpf import flow_verdict
from steer.render.iptables import render_ruleset
from steer.render.xds import ROUTE_TYPE, render_resources
from tests.samples import CLIENT, WEB, policy_yaml, tenant_client_policies

ALLOWED_TO_EXCLUDE = {LABEL_ALLOW_EXCLUSIONS: "true"}


def pods(client_namespace: str, web_annotations: dict[str, str]) -> list[Pod]:
    return [
        replace(CLIENT, namespace=client_namespace),
        replace(WEB, annotations=web_annotations, namespace_labels=ALLOWED_TO_EXCLUDE),
    ]


def web_ingress_http_for(client_ip: str) -> list:  # type: ignore[type-arg]
    spec = (
        "spec:\n  podSelector:\n    matchLabels: {app: web}\n  ingress:\n"
        "    defaultAction: Allow\n    rules:\n      - name: no-admin\n        action: Deny\n"
        f"        from: [{{cidr: {client_ip}/32}}]\n        ports: [{{port: 8080}}]\n"
        "        http:\n          paths: [{prefix: /admin}]\n"
    )
    policies, errors = parse_policies(policy_yaml(spec, "web"), "web.yaml")
    assert not errors
    return policies


@pytest.mark.parametrize(
    ("namespace", "verdict"), [("default", VERDICT_ALLOW), ("tenant", VERDICT_L7)]
)
def test_an_inbound_exclusion_skips_envoy_only_for_its_own_namespace(
    namespace: str, verdict: int
) -> None:
    enforcement = resolve(
        tenant_client_policies(WEB.ip), pods(namespace, {ANNOTATION_EXCLUDE_INBOUND_PORTS: "8080"})
    )
    client = enforcement.pod_by_ip(IPv4Address(CLIENT.ip))
    assert client is not None
    assert flow_verdict(enforcement, client, IPv4Address(WEB.ip), 8080) == verdict
    rules = [r for r in render_ruleset(enforcement).rules if r.chain == "STEER-NAT"]
    limits = [i for i, r in enumerate(rules) if r.comment.startswith("exclusion-limit:")]
    excluded = next(i for i, r in enumerate(rules) if r.comment.startswith("exclude-inbound"))
    if verdict == VERDICT_L7:
        # Redirected to Envoy before the exclusion can return the flow.
        assert limits and max(limits) < excluded
        assert f"{CLIENT.ip}/32" in rules[limits[0]].args
    else:
        assert not limits


@pytest.mark.parametrize(
    ("namespace", "verdict"), [("default", VERDICT_ALLOW), ("tenant", VERDICT_L7)]
)
def test_an_outbound_exclusion_never_skips_a_foreign_destinations_http_rules(
    namespace: str, verdict: int
) -> None:
    client = replace(
        CLIENT,
        namespace=namespace,
        annotations={ANNOTATION_EXCLUDE_OUTBOUND_PORTS: "8080"},
        namespace_labels=ALLOWED_TO_EXCLUDE,
    )
    enforcement = resolve(web_ingress_http_for(CLIENT.ip), [client, WEB])
    managed = enforcement.pod_by_ip(IPv4Address(CLIENT.ip))
    assert managed is not None
    assert flow_verdict(enforcement, managed, IPv4Address(WEB.ip), 8080) == verdict
    comments = [r.comment for r in render_ruleset(enforcement).rules if r.chain == "STEER-NAT"]
    assert any(c.startswith("exclusion-limit:") for c in comments) is (verdict == VERDICT_L7)


def test_rules_with_the_same_name_keep_separate_rbac_policies() -> None:
    """Validation refuses duplicate names at load; the rendered keys must not depend on it:
    a map key seen twice would silently drop a Deny rule."""
    [policy] = web_ingress_http_for(CLIENT.ip)
    ingress = policy.spec.ingress
    assert ingress is not None
    rule = ingress.rules[0]
    twin = rule.model_copy(update={"name": rule.name})
    doubled = policy.model_copy(
        update={
            "spec": policy.spec.model_copy(
                update={"ingress": ingress.model_copy(update={"rules": (rule, twin)})}
            )
        }
    )
    routes = render_resources(resolve([doubled], [CLIENT, WEB]))[ROUTE_TYPE]
    route = routes[f"steer-dst-{WEB.ip}-32"]
    config = route.virtual_hosts[0].typed_per_filter_config["steer.rbac.ingress-deny"]
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

    per_route = rbac_pb2.RBACPerRoute()
    config.Unpack(per_route)
    names = [n for n in per_route.rbac.rules.policies if "no-admin" in n]
    assert len(names) == 2, names
