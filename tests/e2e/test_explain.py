"""`steer explain` agrees with what really happens, over random policies, on both
datapaths: for each request, the outcome it predicts (a refused connect, 403, 400 or the
server's 200) is the one the client gets from the real kernel and the real Envoy, and the
datapath it names is the client's. Seeded and bounded: the same examples on every run."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
from hypothesis import given

from steer.cli import main
from tests.e2e.conftest import HTTP_PORT, PodsNode
from tests.e2e.test_service_conformance import (
    METHODS,
    RandomPolicy,
    apply_random,
    outcome,
    over_random_policies,
    policies,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.envoy,
    pytest.mark.usefixtures("http_servers"),
]

# Paths Envoy normalises before matching, beside the plain ones the rules name.
PATHS = ("/a/", "/a/x", "/b/", "/c", "/b/../a/x", "/a/%2e%2e/b/", "//a/x", "/a%2Fx")


def explained(method: str, path: str, port: int = HTTP_PORT) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                *("explain", "--json", "--from", "default/client"),
                *("--to", f"default/web:{port}", "--method", method, "--path", path),
            ]
        )
    assert code == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def predicted(result: dict[str, Any]) -> str:
    return "refused" if result["status"] is None else str(result["status"])


@over_random_policies
@given(policy=policies)
def test_explain_agrees_with_real_requests(node: PodsNode, policy: RandomPolicy) -> None:
    apply_random(node, policy)
    for method in METHODS:
        for path in PATHS:
            result = explained(method, path)
            real = outcome(node, node.ip("web"), HTTP_PORT, method, path)
            assert predicted(result) == real, (method, path, result, real)
            assert result["dataplane"] == node.dataplane
            assert result["via_envoy"] == (result["http"] is not None)
            if real in ("403", "refused"):
                # A denial always names what decided it.
                assert result["policy"] and result["rule"], result
