"""`steer observe` on both datapaths: requests through the real Envoy reach the agent over
gRPC ALS and come back out of `steer observe --json`, each with the client pod, its
datapath, the verdict and the policy and rule that decided it."""

from __future__ import annotations

import contextlib
import io
import json
import time
from typing import Any

import pytest

from steer.cli import main
from tests.e2e.conftest import HTTP_PORT, PodsNode
from tests.e2e.test_http_policy import (
    ALLOWED,
    DENIED,
    apply,
    exact,
    expect,
    http_rule,
    ingress,
    prefix,
    request,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.envoy,
    pytest.mark.usefixtures("http_servers"),
]

# The interface outside checks rely on (docs/observability.md).
KEYS = {
    "pod", "namespace", "pid", "comm", "src", "dst", "dataplane", "verdict", "layer",
    "policy", "rule", "method", "path", "status",
}  # fmt: skip
WEB_PUBLIC = ingress(
    "web",
    {"name": "public", **http_rule(paths=[prefix("/public/")])},
    {"name": "no-secret", **http_rule("Deny", paths=[exact("/public/secret")])},
)


def observe(*args: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["observe", "--json", *args]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def observed(path: str, count: int = 1) -> list[dict[str, Any]]:
    """The events for `path`, once Envoy has flushed them (every 200 ms)."""
    deadline = time.monotonic() + 10
    while True:
        events = [e for e in observe("--last", "500") if e["path"] == path]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def test_allowed_and_denied_requests_name_pod_datapath_policy_and_rule(node: PodsNode) -> None:
    apply(node, WEB_PUBLIC)
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    cases = {
        f"/public/{tag}": (ALLOWED, "allowed", 200, "public"),
        f"/admin/{tag}": (DENIED, "denied", 403, "default-deny"),
    }
    for path, (outcome, *_) in cases.items():
        expect(request(node, path), outcome)
    expect(request(node, "/public/secret"), DENIED)
    for path, (_, verdict, status, rule) in cases.items():
        (event,) = observed(path)
        assert event.keys() >= KEYS
        assert (event["pod"], event["namespace"], event["dataplane"]) == (
            "client",
            "default",
            node.dataplane,
        )
        assert (event["verdict"], event["status"], event["layer"]) == (verdict, status, "http")
        assert (event["policy"], event["rule"]) == ("default/web-ingress", rule)
        assert (event["method"], event["dst"]) == ("GET", f"{node.ip('web')}:{HTTP_PORT}")
        assert event["src"].startswith(f"{node.ip('client')}:")
    secret = observed("/public/secret")[-1]
    # Envoy's RBAC verdict names the deny rule itself.
    assert (secret["verdict"], secret["rule"], secret["details"]) == (
        "denied",
        "no-secret",
        "rbac_access_denied_matched_policy[default/web:default/web-ingress/1/no-secret]",
    )


def test_filters_select_events(node: PodsNode) -> None:
    apply(node, WEB_PUBLIC)
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    expect(request(node, f"/public/{tag}"), ALLOWED)
    expect(request(node, f"/admin/{tag}"), DENIED)
    observed(f"/admin/{tag}")
    denied = observe("--last", "500", "--verdict", "denied", "--status", "403")
    assert f"/admin/{tag}" in {e["path"] for e in denied}
    assert all(e["verdict"] == "denied" for e in denied)
    by_pod = observe("--last", "500", "--pod", "default/client", "--port", str(HTTP_PORT))
    assert {f"/public/{tag}", f"/admin/{tag}"} <= {e["path"] for e in by_pod}
    assert observe("--last", "500", "--pod", "nobody") == []
