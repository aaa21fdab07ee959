"""The L4 verdict of a new flow (decide_flow over resolve()), as documented in enforce.py."""

from __future__ import annotations

from ipaddress import IPv4Address
from itertools import permutations, product
from typing import Any

import pytest

from steer.constants import (
    ANNOTATION_INJECT,
    LABEL_ALLOW_OPT_OUT,
    MARK_MAX_POLICY_ID,
    VERDICT_ALLOW,
    VERDICT_DENY,
    VERDICT_L7,
)
from steer.model.enforce import Enforcement, FlowVerdict, decide_flow, resolve
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy, LabelSelector
from tests.samples import API, CLIENT, PODS, WEB, sample_enforcement

NAMES = {VERDICT_ALLOW: "allow", VERDICT_DENY: "deny", VERDICT_L7: "l7"}
HTTP_GET = {"methods": ["GET"]}


# --- builders ---------------------------------------------------------------------------------


def rule(action: str = "Allow", *, http: bool = False, **fields: Any) -> dict[str, Any]:
    return {"action": action, **fields} | ({"http": HTTP_GET} if http else {})


def from_peers(*peers: dict[str, Any]) -> dict[str, Any]:
    return {"from": list(peers)}


def pods_labelled(**labels: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": labels}}


def from_pods(**labels: str) -> dict[str, Any]:
    return from_peers(pods_labelled(**labels))


def ports(*ranges: int | tuple[int, int]) -> dict[str, Any]:
    specs = [{"port": r} if isinstance(r, int) else {"port": r[0], "endPort": r[1]} for r in ranges]
    return {"ports": specs}


def section(*rules: dict[str, Any], default: str = "Deny") -> dict[str, Any]:
    return {"defaultAction": default, "rules": list(rules)}


def policy(
    name: str,
    selector: dict[str, str],
    *,
    namespace: str = "default",
    ingress: dict[str, Any] | None = None,
    egress: dict[str, Any] | None = None,
) -> HTTPPolicy:
    spec: dict[str, Any] = {"podSelector": {"matchLabels": selector}}
    spec |= {k: v for k, v in (("ingress", ingress), ("egress", egress)) if v is not None}
    return HTTPPolicy.model_validate(
        {
            "apiVersion": "steer.dev/v1alpha1",
            "kind": "HTTPPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def web_ingress(*rules: dict[str, Any], default: str = "Deny", name: str = "web") -> HTTPPolicy:
    return policy(name, {"app": "web"}, ingress=section(*rules, default=default))


def client_egress(
    *rules: dict[str, Any], default: str = "Deny", name: str = "client"
) -> HTTPPolicy:
    return policy(name, {"app": "client"}, egress=section(*rules, default=default))


def flow(enforcement: Enforcement, src: Pod | str, dst: Pod | str, port: int) -> FlowVerdict:
    def ip(end: Pod | str) -> IPv4Address:
        return IPv4Address(end.ip if isinstance(end, Pod) else end)

    return decide_flow(enforcement, ip(src), ip(dst), port)


def verdict_of(
    policies: list[HTTPPolicy],
    src: Pod | str = CLIENT,
    dst: Pod | str = WEB,
    port: int = 80,
    pods: tuple[Pod, ...] = PODS,
) -> FlowVerdict:
    return flow(resolve(policies, pods), src, dst, port)


def decided_by(enforcement: Enforcement, verdict: int, key: str | None) -> FlowVerdict:
    return FlowVerdict(verdict, enforcement.policy_ids[key] if key else 0)


# --- no policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), list(permutations(PODS, 2)), ids=lambda p: p.name)
def test_unrestricted_pods_allow_every_flow(src: Pod, dst: Pod) -> None:
    enforcement = resolve([], PODS)
    assert (enforcement.egress, enforcement.ingress) == ({}, {})
    assert flow(enforcement, src, dst, 80) == FlowVerdict(VERDICT_ALLOW, 0)


def test_a_side_stays_unrestricted_until_a_policy_with_that_section_selects_it() -> None:
    enforcement = resolve([web_ingress()], PODS)
    assert set(enforcement.ingress) == {IPv4Address(WEB.ip)}
    assert enforcement.egress == {}
    assert flow(enforcement, WEB, API, 80) == FlowVerdict(VERDICT_ALLOW, 0)


# --- the shipped samples ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "port", "verdict", "deciding"),
    [
        (CLIENT, WEB, 9090, VERDICT_DENY, "default/web"),
        (CLIENT, API, 7001, VERDICT_DENY, "default/api"),
        (CLIENT, "169.254.169.254", 80, VERDICT_DENY, "default/client-egress"),
        (API, WEB, 8080, VERDICT_DENY, "default/web"),
        (WEB, API, 7000, VERDICT_DENY, "default/api"),
        (API, CLIENT, 80, VERDICT_ALLOW, None),
        (CLIENT, "10.9.9.9", 443, VERDICT_ALLOW, "default/client-egress"),
    ],
    ids=[
        "debug-port-denied",
        "api-other-port",
        "metadata-range",
        "web-not-from-api",
        "api-not-from-web",
        "client-unrestricted-ingress",
        "client-egress-default-allow",
    ],
)
def test_sample_policies(
    src: Pod, dst: Pod | str, port: int, verdict: int, deciding: str | None
) -> None:
    enforcement = sample_enforcement()
    assert flow(enforcement, src, dst, port) == decided_by(enforcement, verdict, deciding)


@pytest.mark.parametrize(
    ("dst", "port", "verdict"), [(WEB, 8080, VERDICT_L7), (API, 7000, VERDICT_ALLOW)]
)
def test_sample_policies_let_the_client_through(dst: Pod, port: int, verdict: int) -> None:
    assert flow(sample_enforcement(), CLIENT, dst, port).verdict == verdict


# --- within one side ---------------------------------------------------------------------------

DENY_80 = rule("Deny", **ports(80))
L7_80 = rule(http=True, **ports(80))
L7_DENY_80 = rule("Deny", http=True, **ports(80))
ALLOW_80 = rule(**ports(80))


@pytest.mark.parametrize(
    ("rules", "verdict"),
    [
        *(
            pytest.param(p, VERDICT_DENY, id="deny-l7-allow")
            for p in permutations([DENY_80, L7_80, ALLOW_80])
        ),
        *(pytest.param(p, VERDICT_L7, id="l7-allow") for p in permutations([L7_80, ALLOW_80])),
        *(
            pytest.param(p, VERDICT_DENY, id="deny-allow")
            for p in permutations([DENY_80, ALLOW_80])
        ),
        pytest.param((ALLOW_80,), VERDICT_ALLOW, id="allow"),
        pytest.param((L7_DENY_80,), VERDICT_L7, id="http-deny-goes-to-envoy"),
    ],
)
def test_within_a_side_deny_beats_l7_beats_allow_in_any_order(
    rules: tuple[dict[str, Any], ...], verdict: int
) -> None:
    assert verdict_of([web_ingress(*rules, default="Allow")]).verdict == verdict


@pytest.mark.parametrize("deny_in", ["a", "b"])
def test_rule_classes_combine_across_policies_on_one_side(deny_in: str) -> None:
    other = "b" if deny_in == "a" else "a"
    policies = [web_ingress(DENY_80, name=deny_in), web_ingress(L7_80, ALLOW_80, name=other)]
    enforcement = resolve(policies, PODS)
    expected = decided_by(enforcement, VERDICT_DENY, f"default/{deny_in}")
    assert flow(enforcement, CLIENT, WEB, 80) == expected


@pytest.mark.parametrize(("default", "verdict"), [("Allow", VERDICT_ALLOW), ("Deny", VERDICT_DENY)])
def test_default_action_applies_when_no_rule_matches(default: str, verdict: int) -> None:
    enforcement = resolve([web_ingress(DENY_80, L7_80, ALLOW_80, default=default)], PODS)
    assert flow(enforcement, CLIENT, WEB, 81) == decided_by(enforcement, verdict, "default/web")


@pytest.mark.parametrize("deny_name", ["a-strict", "z-strict"])
def test_deny_default_wins_when_two_policies_select_a_pod(deny_name: str) -> None:
    policies = [web_ingress(name="lenient", default="Allow"), web_ingress(name=deny_name)]
    enforcement = resolve(policies, PODS)
    expected = decided_by(enforcement, VERDICT_DENY, f"default/{deny_name}")
    assert flow(enforcement, CLIENT, WEB, 80) == expected


def test_an_allow_rule_of_one_policy_overrides_another_policys_deny_default() -> None:
    policies = [web_ingress(name="strict"), web_ingress(ALLOW_80, name="opens-80", default="Allow")]
    enforcement = resolve(policies, PODS)
    assert flow(enforcement, CLIENT, WEB, 80) == decided_by(
        enforcement, VERDICT_ALLOW, "default/opens-80"
    )
    assert flow(enforcement, CLIENT, WEB, 81) == decided_by(
        enforcement, VERDICT_DENY, "default/strict"
    )


# --- egress and ingress together --------------------------------------------------------------

SIDE_GIVING: dict[int, dict[str, Any]] = {
    VERDICT_ALLOW: section(default="Allow"),
    VERDICT_L7: section(rule(http=True)),
    VERDICT_DENY: section(),
}
PRIORITY = (VERDICT_DENY, VERDICT_L7, VERDICT_ALLOW)


@pytest.mark.parametrize(
    ("egress", "ingress"),
    list(product([None, *SIDE_GIVING], repeat=2)),
    ids=lambda v: NAMES.get(v, "unrestricted"),
)
def test_egress_and_ingress_combine_deny_over_l7_over_allow(
    egress: int | None, ingress: int | None
) -> None:
    """client -> web, where the client's egress and web's ingress each give a verdict."""
    policies, sides = [], {}
    if egress is not None:
        policies.append(policy("out", {"app": "client"}, egress=SIDE_GIVING[egress]))
        sides["default/out"] = egress
    if ingress is not None:
        policies.append(policy("in", {"app": "web"}, ingress=SIDE_GIVING[ingress]))
        sides["default/in"] = ingress
    enforcement = resolve(policies, PODS)

    result = flow(enforcement, CLIENT, WEB, 80)

    expected = next((v for v in PRIORITY if v in sides.values()), VERDICT_ALLOW)
    assert result.verdict == expected
    deciders = {enforcement.policy_ids[key] for key, v in sides.items() if v == expected}
    assert result.policy_id in (deciders or {0})


# --- peers and ports --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "default", "verdict"),
    [("Deny", "Allow", VERDICT_ALLOW), ("Allow", "Deny", VERDICT_DENY)],
)
def test_pod_selector_peer_matching_nothing_never_matches(
    action: str, default: str, verdict: int
) -> None:
    enforcement = resolve(
        [web_ingress(rule(action, **from_pods(app="nobody")), default=default)], PODS
    )
    [resolved] = enforcement.ingress[IPv4Address(WEB.ip)].rules
    assert resolved.peers == ()
    assert flow(enforcement, CLIENT, WEB, 80).verdict == verdict


@pytest.mark.parametrize(
    ("src", "verdict"),
    [
        (CLIENT, VERDICT_ALLOW),
        (API, VERDICT_DENY),
        ("10.1.2.3", VERDICT_ALLOW),
        ("10.2.0.1", VERDICT_DENY),
    ],
)
def test_peers_match_selected_pods_and_cidrs(src: Pod | str, verdict: int) -> None:
    peers = from_peers(pods_labelled(app="client"), {"cidr": "10.1.0.0/16"})
    assert verdict_of([web_ingress(rule(**peers))], src=src).verdict == verdict


@pytest.mark.parametrize(
    ("port", "verdict"),
    [
        (7999, VERDICT_DENY),
        (8000, VERDICT_ALLOW),
        (8050, VERDICT_ALLOW),
        (8100, VERDICT_ALLOW),
        (8101, VERDICT_DENY),
        (443, VERDICT_ALLOW),
        (444, VERDICT_DENY),
    ],
)
def test_port_ranges_include_both_ends(port: int, verdict: int) -> None:
    assert verdict_of([web_ingress(rule(**ports((8000, 8100), 443)))], port=port).verdict == verdict


def test_policy_ids_fit_the_mark_and_do_not_depend_on_other_policies() -> None:
    web, client = web_ingress(name="web"), client_egress(name="client")
    alone = resolve([web], PODS).policy_ids
    together = resolve([policy("aaa", {}, egress=section()), web, client], PODS).policy_ids
    assert together["default/web"] == alone["default/web"]
    assert all(1 <= i <= MARK_MAX_POLICY_ID for i in together.values())


# --- which pods are steered -------------------------------------------------------------------

OPTED_OUT = Pod(
    "legacy",
    "default",
    "10.244.0.9",
    {"app": "web"},
    {ANNOTATION_INJECT: "disabled"},
    namespace_labels={LABEL_ALLOW_OPT_OUT: "true"},
)


def test_pod_with_injection_disabled_is_not_steered() -> None:
    enforcement = resolve([web_ingress(name="web")], (CLIENT, OPTED_OUT))
    assert [m.pod for m in enforcement.pods] == [CLIENT]
    assert (enforcement.ingress, enforcement.egress) == ({}, {})
    assert enforcement.warnings == ("policy default/web: podSelector matches no steered pod",)
    assert flow(enforcement, CLIENT, OPTED_OUT, 80) == FlowVerdict(VERDICT_ALLOW, 0)


def test_policy_selecting_a_steered_pod_gives_no_warning() -> None:
    assert resolve([web_ingress()], PODS).warnings == ()


def test_opting_out_of_injection_does_not_escape_a_deny_peer_rule() -> None:
    attacker = Pod("x", "default", "10.244.0.9", {"app": "x"}, {ANNOTATION_INJECT: "disabled"})
    policies = [web_ingress(rule("Deny", **from_pods(app="x")), default="Allow")]
    assert verdict_of(policies, src=attacker, pods=(WEB, attacker)).verdict == VERDICT_DENY


# --- namespaces -------------------------------------------------------------------------------

SHOP_WEB = Pod("web", "shop", "10.244.1.3", {"app": "web"})
SHOP_CLIENT = Pod("client", "shop", "10.244.1.2", {"app": "client"})
TWO_NAMESPACES = (*PODS, SHOP_WEB, SHOP_CLIENT)


def test_policy_selects_pods_in_its_own_namespace_only() -> None:
    enforcement = resolve([policy("all", {}, namespace="shop", ingress=section())], TWO_NAMESPACES)
    assert set(enforcement.ingress) == {IPv4Address(SHOP_WEB.ip), IPv4Address(SHOP_CLIENT.ip)}
    assert flow(enforcement, CLIENT, WEB, 80).verdict == VERDICT_ALLOW
    assert flow(enforcement, CLIENT, SHOP_WEB, 80).verdict == VERDICT_DENY


@pytest.mark.parametrize(
    ("src", "verdict"),
    [(CLIENT, VERDICT_ALLOW), (SHOP_CLIENT, VERDICT_DENY)],
    ids=["same-ns", "other-ns"],
)
def test_pod_selector_peers_are_namespace_local(src: Pod, verdict: int) -> None:
    policies = [web_ingress(rule(**from_pods(app="client")))]
    assert verdict_of(policies, src=src, pods=TWO_NAMESPACES).verdict == verdict


def test_policy_in_a_namespace_without_pods_warns() -> None:
    enforcement = resolve([policy("p", {}, namespace="empty", egress=section())], PODS)
    assert enforcement.warnings == ("policy empty/p: podSelector matches no steered pod",)


# --- label selectors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "matches"),
    [
        ({"key": "tier", "operator": "In", "values": ["front", "edge"]}, True),
        ({"key": "tier", "operator": "In", "values": ["back"]}, False),
        ({"key": "zone", "operator": "In", "values": ["a"]}, False),
        ({"key": "tier", "operator": "NotIn", "values": ["back"]}, True),
        ({"key": "tier", "operator": "NotIn", "values": ["front"]}, False),
        ({"key": "zone", "operator": "NotIn", "values": ["a"]}, True),
        ({"key": "tier", "operator": "Exists"}, True),
        ({"key": "zone", "operator": "Exists"}, False),
        ({"key": "zone", "operator": "DoesNotExist"}, True),
        ({"key": "tier", "operator": "DoesNotExist"}, False),
    ],
)
def test_match_expressions_follow_kubernetes(expression: dict[str, Any], matches: bool) -> None:
    selector = LabelSelector.model_validate({"matchExpressions": [expression]})
    assert selector.matches({"app": "web", "tier": "front"}) is matches
