"""A request through a Service gets what the same request to the backend gets, over random
policies, on both datapaths, with a real Envoy: the ClusterIP is never a way around a
backend's policy, nor stricter than it.

One documented difference (docs/architecture.md, "Services", known limits): on iptables,
a Service whose backend has HTTP rules is sent to Envoy before kube-proxy, so a client
the backend refuses at L4 gets Envoy's 403 instead of a refused connect. Never an allow.
Seeded and bounded: the same examples on every run."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer.lab.podproc import PodProcessError
from tests.e2e.conftest import HTTP_PORT, PodsNode
from tests.e2e.test_http_policy import apply, egress, ingress

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.envoy,
    pytest.mark.usefixtures("http_servers"),
]

CLIENT = {"podSelector": {"matchLabels": {"app": "client"}}}
WEB = {"podSelector": {"matchLabels": {"app": "web"}}}
PATHS = ("/a/", "/a/x", "/b/", "/c")
METHODS = ("GET", "POST")


def _http(action: str, methods: list[str], path: dict[str, str]) -> dict[str, Any]:
    return {"action": action, "http": {"methods": methods, "paths": [path]}}


def _l4(action: str, peer: dict[str, Any], key: str, port: int) -> dict[str, Any]:
    return {"action": action, key: [peer], "ports": [{"port": port}]}


def _rules(peer_key: str, peer: dict[str, Any]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Rules one side may hold at web's port: HTTP allows and denies on paths and methods,
    and L4 allows or denies of the peer (or of everybody) at the port."""
    http = st.builds(
        _http,
        st.sampled_from(["Allow", "Deny"]),
        st.lists(st.sampled_from(METHODS), min_size=1, max_size=2, unique=True),
        st.sampled_from([{"prefix": "/a/"}, {"exact": "/a/x"}, {"prefix": "/b/"}]),
    )
    l4 = st.builds(
        _l4,
        st.sampled_from(["Allow", "Deny"]),
        st.sampled_from([peer]),
        st.just(peer_key),
        st.sampled_from([HTTP_PORT, 9999]),
    )
    return st.lists(st.one_of(http, l4), max_size=3)


def _named(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": f"r{i}", **rule} for i, rule in enumerate(rules)]


policies = st.tuples(
    _rules("from", CLIENT),
    st.sampled_from(["Allow", "Deny"]),
    _rules("to", WEB),
    st.sampled_from(["Allow", "Deny"]),
)
RandomPolicy = tuple[list[dict[str, Any]], str, list[dict[str, Any]], str]
# Seeded and bounded: the same ten policies on every run, on the module's node.
over_random_policies = settings(
    derandomize=True,
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def apply_random(node: PodsNode, policy: RandomPolicy) -> None:
    """One drawn policy: web's ingress and client's egress."""
    web_rules, web_default, client_rules, client_default = policy
    apply(
        node,
        ingress("web", *_named(web_rules), default=web_default),
        egress("client", *_named(client_rules), default=client_default),
    )


def outcome(node: PodsNode, address: str, port: int, method: str, path: str) -> str:
    try:
        reply = node.workers["client"].request(address, port, method, path)
    except PodProcessError as exc:
        text = str(exc).lower()
        return "refused" if "refused" in text or "reset" in text else f"error: {exc}"
    return str(reply.status)


@over_random_policies
@given(policy=policies)
def test_a_service_gets_exactly_the_backends_verdicts(node: PodsNode, policy: RandomPolicy) -> None:
    apply_random(node, policy)
    vip = next(s.cluster_ip for s in node.lab.services if s.name == "web")
    assert vip
    for method in METHODS:
        for path in PATHS:
            direct = outcome(node, node.ip("web"), HTTP_PORT, method, path)
            through = outcome(node, vip, 80, method, path)
            assert not direct.startswith("error"), direct
            if node.dataplane == "iptables" and direct == "refused":
                assert through in ("refused", "403"), (method, path, direct, through)
            else:
                assert through == direct, (method, path, direct, through)
