"""Renderers against committed golden files. Regenerate: STEER_REGEN_GOLDEN=1 pytest tests/golden"""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from google.protobuf.json_format import MessageToDict

from steer.model.enforce import resolve
from steer.model.service import Backend, Frontend
from steer.model.servicepolicy import envoy_frontends, service_listeners
from steer.render.bpf import render_pod_policy
from steer.render.iptables import (
    Jump,
    KernelState,
    ServiceSteering,
    cleanup_text,
    render_ruleset,
    restore_text,
)
from steer.render.xds import LISTENER_TYPE, ROUTE_TYPE, XdsCache, render_resources
from tests.golden.golden import check_golden
from tests.samples import API, CLIENT, PODS, WEB, sample_enforcement, sample_policies


def test_iptables_fresh_node_inserts_jumps_and_declares_every_chain() -> None:
    check_golden(
        "iptables_demo.rules", restore_text(render_ruleset(sample_enforcement()), KernelState())
    )


def test_iptables_reapply_skips_present_jumps_and_deletes_stale_chains() -> None:
    ruleset = render_ruleset(sample_enforcement())
    current = KernelState(
        chains={"mangle": frozenset({*ruleset.chains["mangle"], "STEER-I-0000000000"})},
        jumps=frozenset(ruleset.jumps),
    )
    text = restore_text(ruleset, current)
    assert "-I " not in text
    assert ":STEER-I-0000000000 - [0:0]" in text
    assert "-X STEER-I-0000000000" in text
    check_golden("iptables_reapply.rules", text)


def test_iptables_cleanup_touches_only_steer_chains_and_jumps() -> None:
    ruleset = render_ruleset(sample_enforcement())
    current = KernelState(
        chains={t: frozenset(c) for t, c in ruleset.chains.items()}, jumps=frozenset(ruleset.jumps)
    )
    check_golden("iptables_cleanup.rules", cleanup_text(current))
    assert cleanup_text(KernelState()) == ""


def test_iptables_services_are_decided_after_kube_proxy_or_sent_to_envoy_before_it() -> None:
    """web's ClusterIP port 80 leads to web:8080, where HTTP rules apply: steered pods'
    flows to it are marked L7 before kube-proxy's DNAT; api's port 7000 (L4 rules only)
    and a NodePort are left to kube-proxy and decided on the backend in STEER-DNAT."""
    enforcement = sample_enforcement()
    web = Frontend(
        IPv4Address("10.96.0.10"), 80, "default/web", "http", (Backend(IPv4Address(WEB.ip), 8080),)
    )
    api = Frontend(
        IPv4Address("10.96.0.11"), 7000, "default/api", "", (Backend(IPv4Address(API.ip), 7000),)
    )
    node_port = replace(web, ip=IPv4Address("10.244.0.1"), port=30080, node_port=True)
    frontends = [web, api, node_port]
    via_envoy = envoy_frontends(enforcement, frontends)
    assert via_envoy == {(web.ip, 80), (node_port.ip, 30080)}
    listeners = service_listeners(enforcement, frontends)
    assert list(listeners) == [("default/web", "http")]
    envoy_port = listeners["default/web", "http"].envoy_port
    services = ServiceSteering(
        tuple(sorted(((f.ip, f.port) for f in frontends), key=lambda k: (int(k[0]), k[1]))),
        via_envoy,
        (IPv4Network("10.244.0.0/16"),),
        (((web.ip, 80), envoy_port), ((node_port.ip, 30080), envoy_port)),
    )
    ruleset = render_ruleset(enforcement, services=services)
    text = restore_text(ruleset, KernelState())
    # Both ways of dialling web's port 80 reach its Service listener.
    assert text.count(f"--to-ports {envoy_port}") == 2
    check_golden("iptables_services.rules", text)


def test_xds_service_listener_tags_requests_with_the_service() -> None:
    """The Service port's own listener: one chain per backend, each with the backend's
    route, behind a filter that tags every request with the Service; no default chain."""
    enforcement = sample_enforcement()
    web = Frontend(
        IPv4Address("10.96.0.10"), 80, "default/web", "http", (Backend(IPv4Address(WEB.ip), 8080),)
    )
    (listener,) = service_listeners(enforcement, [web]).values()
    resources = render_resources(enforcement, services=[listener])
    rendered = resources[LISTENER_TYPE][listener.name]
    check_golden(
        "xds_service_listener.json",
        json.dumps(
            MessageToDict(rendered, preserving_proto_field_name=True), indent=1, sort_keys=True
        )
        + "\n",
    )


def test_iptables_pods_without_policy_get_no_side_chain() -> None:
    enforcement = sample_enforcement((CLIENT, WEB))
    ruleset = render_ruleset(enforcement)
    # client has egress policy, web has ingress policy; api is absent: STEER-PRE,
    # STEER-DECIDE and STEER-DNAT, one chain per side and the shared chain holding each
    # side's rules.
    assert len(ruleset.chains["mangle"]) == 7


def test_iptables_pods_with_the_same_rules_share_one_chain_of_them() -> None:
    """Replicas under the same policies: one chain of rules, one jump per pod into it."""
    replica = replace(WEB, name="web-2", ip="10.244.0.9")
    ruleset = render_ruleset(sample_enforcement((CLIENT, WEB, replica)))
    ingress = [c for c in ruleset.chains["mangle"] if c.startswith("STEER-I-")]
    shared = [c for c in ruleset.chains["mangle"] if c.startswith("STEER-SI-")]
    assert len(ingress) == 2 and len(shared) == 1
    for chain in ingress:
        assert [r.args for r in ruleset.rules_of("mangle", chain)] == [("-j", shared[0])]


def test_iptables_every_rule_carries_a_purpose_comment() -> None:
    for rule in render_ruleset(sample_enforcement()).rules:
        assert rule.comment
        assert "--comment steer/" in rule.spec()


@pytest.mark.parametrize("jump", render_ruleset(sample_enforcement()).jumps)
def test_iptables_jumps_only_catch_tcp(jump: Jump) -> None:
    assert jump.args[:2] == ("-p", "tcp")


def test_xds_resources_demo() -> None:
    resources = render_resources(sample_enforcement())
    as_json = {
        type_url.rsplit(".", 1)[-1]: {
            name: MessageToDict(msg, preserving_proto_field_name=True)
            for name, msg in sorted(by_name.items())
        }
        for type_url, by_name in sorted(resources.items())
    }
    check_golden("xds_demo.json", json.dumps(as_json, indent=1, sort_keys=True) + "\n")


def test_iptables_ebpf_client_is_let_through_where_connect4_decided() -> None:
    ruleset = render_ruleset(sample_enforcement(), frozenset({"default/client"}))
    text = restore_text(ruleset, KernelState())
    assert "steer/ebpf:default/client" in text
    assert "steer/redirect-outbound:default/client" not in text
    check_golden("iptables_ebpf_client.rules", text)


def test_bpf_policy_map_for_each_pod() -> None:
    enforcement = sample_enforcement()
    document = {
        pod.pod.key: [
            {
                "prefix": str(entry.prefix),
                "default": entry.default,
                "segments": [[s.lo, s.hi, s.verdict] for s in entry.segments],
            }
            for entry in render_pod_policy(enforcement, pod).prefixes
        ]
        for pod in enforcement.pods
    }
    check_golden("bpf_policy_demo.json", json.dumps(document, indent=1, sort_keys=True) + "\n")


def test_a_route_cache_changes_nothing_but_the_work_done() -> None:
    """Rendering through the control plane's cache equals rendering afresh, and a change to
    one pod's policy rebuilds that pod's route only."""
    cache = XdsCache()
    before = render_resources(sample_enforcement(), cache)
    assert before == render_resources(sample_enforcement())
    api_only = [p for p in sample_policies() if p.metadata.name != "api"]
    after = render_resources(resolve(api_only, PODS), cache)
    assert after == render_resources(resolve(api_only, PODS))
    routes_before, routes_after = before[ROUTE_TYPE], after[ROUTE_TYPE]
    api_route = f"steer-dst-{API.ip}-32"
    assert routes_after[api_route] is not routes_before[api_route]
    unchanged = [name for name in routes_after if name != api_route]
    assert all(routes_after[n] is routes_before[n] for n in unchanged)
