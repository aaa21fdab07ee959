"""`steer explain` over the sample policies (steer/samples): web takes GET/HEAD of /public/
on 8080 from client and nothing on 9090; client must not send x-internal to web:8080.
Agreement with Envoy and the kernel is tested for real in tests/e2e/test_explain.py."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from steer.model.explain import HTTPRequest, explain, normalise_path
from tests.samples import API, CLIENT, WEB, sample_enforcement


def run(dst: str, port: int, **request: Any) -> dict[str, Any]:
    return explain(
        sample_enforcement(),
        IPv4Address(CLIENT.ip),
        IPv4Address(dst),
        port,
        HTTPRequest(**request),
        dataplane="ebpf",
    ).to_json()


def test_an_allowed_request_names_the_rule_that_allows_it() -> None:
    assert run(WEB.ip, 8080, path="/public/index.html") == {
        "dataplane": "ebpf",
        "l4": "allowed",
        "via_envoy": True,
        "http": "allowed",
        "policy": "default/web",
        "rule": "public-read",
        "status": 200,
        "reason": "HTTP allowed: Envoy forwards it to the server",
    }


def test_a_path_no_allow_rule_matches_is_denied_by_the_default() -> None:
    result = run(WEB.ip, 8080, path="/admin")
    assert (result["http"], result["status"]) == ("denied", 403)
    assert (result["policy"], result["rule"]) == ("default/web", "default-deny")


@pytest.mark.parametrize("path", ["/public/../admin", "/public/%2e%2e/admin", "/public/..\\admin"])
def test_dot_segments_are_resolved_before_matching_as_envoy_does(path: str) -> None:
    assert run(WEB.ip, 8080, path=path)["status"] == 403


def test_an_escaped_slash_is_refused_before_any_rule() -> None:
    result = run(WEB.ip, 8080, path="/public%2Fadmin")
    assert (result["http"], result["status"], result["rule"]) == ("refused", 400, None)


def test_an_egress_deny_on_a_header_wins_over_the_ingress_allow() -> None:
    result = run(WEB.ip, 8080, path="/public/x", headers=(("X-Internal", "1"),))
    assert (result["http"], result["policy"], result["rule"]) == (
        "denied",
        "default/client-egress",
        "no-internal-header",
    )


def test_a_header_name_with_an_underscore_is_refused() -> None:
    assert run(WEB.ip, 8080, path="/public/x", headers=(("x_internal", "1"),))["status"] == 400


def test_an_l4_deny_refuses_the_connect_and_names_its_rule() -> None:
    result = run(WEB.ip, 9090)
    assert (result["l4"], result["via_envoy"], result["http"], result["status"]) == (
        "denied",
        False,
        None,
        None,
    )
    assert (result["policy"], result["rule"]) == ("default/web", "no-debug-port")


def test_a_flow_no_http_rule_covers_goes_direct() -> None:
    result = run(API.ip, 7000)
    assert (result["l4"], result["via_envoy"], result["http"], result["status"]) == (
        "allowed",
        False,
        None,
        200,
    )


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/a/../admin", "/admin"),
        ("//admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/a//../b", "/a/b"),
        ("/x?y=/admin", "/x"),
    ],
)
def test_paths_are_normalised_as_envoy_normalises_them(path: str, normal: str) -> None:
    assert normalise_path(path) == normal
