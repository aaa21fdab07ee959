"""HTTP policy on the local node with a real Envoy: the cases where a policy could be bypassed.

Every test writes the node's whole policy set, waits until the agent, the control plane and
Envoy run exactly that set, and then sends requests from a pod. Outcomes are exact: 200
from the backend named in its JSON body, 403 from Envoy's RBAC filter, or 400 from Envoy
before any filter runs (docs/policy-reference.md "How requests are matched").
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pytest
import yaml

from steer.constants import (
    AGENT_STATUS_FILE,
    API_GROUP_VERSION,
    CONTROL_STATUS_FILE,
    LAB_GATEWAY_IP,
    NODE_NETNS,
    POLICY_KIND,
)
from steer.lab.localnode import read_status, wait_for
from steer.lab.servers import answered_from
from steer.node.datapath import DRIFT_CHECK_S
from steer.source.local import directory_texts, texts_digest
from tests.e2e.conftest import HTTP_PORT, PodsNode

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.envoy,
    pytest.mark.usefixtures("http_servers"),
]

RBAC_DENIED = b"RBAC: access denied"
Rule = dict[str, Any]
Policies = dict[str, str]


# --- policies ---------------------------------------------------------------------------------


def policy(app: str, direction: str, rules: Sequence[Rule], default: str) -> Policies:
    """One HTTPPolicy selecting app=<app>, as the file the operator would write."""
    name = f"{app}-{direction}"
    document = {
        "apiVersion": API_GROUP_VERSION,
        "kind": POLICY_KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            direction: {"defaultAction": default, "rules": list(rules)},
        },
    }
    return {f"{name}.yaml": yaml.safe_dump(document, sort_keys=False)}


def ingress(app: str, *rules: Rule, default: str = "Deny") -> Policies:
    return policy(app, "ingress", rules, default)


def egress(app: str, *rules: Rule, default: str = "Deny") -> Policies:
    return policy(app, "egress", rules, default)


def http_rule(action: str = "Allow", **match: Any) -> Rule:
    return {"action": action, "http": match}


def prefix(path: str) -> dict[str, str]:
    return {"prefix": path}


def exact(path: str) -> dict[str, str]:
    return {"exact": path}


def apply(node: PodsNode, *policies: Policies) -> None:
    """Make these the node's only policies and wait until Envoy has ACKed them."""
    node.write_policies({name: text for p in policies for name, text in p.items()})
    node.wait_synced()


def reported_errors() -> tuple[list[str], list[str]]:
    """Policy errors as the control plane and the agent report them in their status files."""
    control, agent = read_status(CONTROL_STATUS_FILE) or {}, read_status(AGENT_STATUS_FILE) or {}
    return control.get("errors", []), agent.get("last_sync", {}).get("errors", [])


def digests_in_force() -> tuple[str | None, str | None]:
    control, agent = read_status(CONTROL_STATUS_FILE) or {}, read_status(AGENT_STATUS_FILE) or {}
    return control.get("policy_digest"), agent.get("policy_digest")


def both_report(name: str) -> bool:
    return all(any(name in error for error in errors) for errors in reported_errors())


PUBLIC_ONLY = ingress(
    "web",
    http_rule(paths=[prefix("/public/")]),
    http_rule("Deny", paths=[exact("/public/secret")]),
)


# --- requests and outcomes ------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document

    @property
    def from_envoy(self) -> bool:
        return self.headers.get("server") == "envoy"

    @property
    def proxied(self) -> bool:
        """The backend answered a connection from Envoy: its answer names its peer, which
        is Envoy's address when Envoy forwarded the request (the node's Envoy adds no
        x-envoy-* header to tell)."""
        return self.from_envoy and answered_from(self.body) == LAB_GATEWAY_IP


class Outcome(Enum):
    ALLOWED = "200 from the backend"
    DENIED = "403 from Envoy's RBAC filter"
    REJECTED = "400 from Envoy before any filter runs"
    TOO_LARGE = "413 from Envoy, nothing forwarded"


ALLOWED, DENIED, REJECTED = Outcome.ALLOWED, Outcome.DENIED, Outcome.REJECTED
TOO_LARGE = Outcome.TOO_LARGE


def expect(response: Response, outcome: Outcome, *, pod: str = "web", method: str = "GET") -> None:
    shown = f"{response.status} {response.headers} {response.body[:200]!r}"
    if outcome is ALLOWED:
        assert response.status == 200, shown
        if method == "HEAD":
            assert response.headers.get("content-type") == "application/json", shown
        else:
            assert response.json["pod"] == pod, shown
    elif outcome is DENIED:
        assert response.status == 403, shown
        assert response.from_envoy, shown
        assert response.body == (b"" if method == "HEAD" else RBAC_DENIED), shown
    else:
        assert response.status == (400 if outcome is REJECTED else 413), shown
        assert response.from_envoy, shown
        assert not response.proxied, shown


def request(
    node: PodsNode,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    src: str = "client",
    dst: str = "web",
) -> Response:
    """One request on a fresh connection from pod `src` to `dst`:8080."""
    reply = node.workers[src].request(
        node.ip(dst), HTTP_PORT, method, path, list((headers or {}).items())
    )
    return Response(reply.status, reply.body, reply.headers)


def request_with_header_lines(node: PodsNode, path: str, lines: Sequence[str]) -> Response:
    """A request whose header lines are sent exactly as given, repeats included."""
    headers = [(name, value.lstrip()) for name, _, value in (line.partition(":") for line in lines)]
    reply = node.workers["client"].request(node.ip("web"), HTTP_PORT, "GET", path, headers)
    return Response(reply.status, reply.body, reply.headers)


# --- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "outcome"),
    [
        ("/public/x", ALLOWED),
        ("/admin", DENIED),
        # normalize_path resolves dot segments (also percent-encoded, also backslashes)
        # before RBAC sees the path.
        ("/public/../admin", DENIED),
        ("/public/./x", ALLOWED),
        ("/public/%2e%2e/admin", DENIED),
        ("/public/%2E%2E/admin", DENIED),
        ("/public\\..\\admin", DENIED),
        # merge_slashes
        ("//public/x", ALLOWED),
        # path_with_escaped_slashes_action: REJECT_REQUEST, for %2F and %5C in any case.
        ("/public/..%2fadmin", REJECTED),
        ("/public/..%2Fadmin", REJECTED),
        ("/public/..%5cadmin", REJECTED),
        ("/public%2fx", REJECTED),
        # Envoy refuses a fragment in the request target outright.
        ("/public/x#admin", REJECTED),
        # Paths are case-sensitive.
        ("/PUBLIC/x", DENIED),
        # The query string is never part of the matched path, in either direction.
        ("/public/x?admin=1", ALLOWED),
        ("/public/secret", DENIED),
        ("/public/secret?x=1", DENIED),
        # `exact` is exact: a trailing slash is another path (deny with a prefix to cover it).
        ("/public/secret/", ALLOWED),
    ],
)
def test_path_rules_match_the_normalised_path(node: PodsNode, path: str, outcome: Outcome) -> None:
    apply(node, PUBLIC_ONLY)
    expect(request(node, path), outcome)


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        ("/public/./x", "/public/x"),
        ("//public//x", "/public/x"),
        ("/public/a/../x", "/public/x"),
        ("/public/%2e/x", "/public/x"),
        ("/public/x?admin=1", "/public/x?admin=1"),
    ],
)
def test_backend_receives_the_path_that_was_matched(
    node: PodsNode, sent: str, received: str
) -> None:
    apply(node, PUBLIC_ONLY)
    response = request(node, sent)
    expect(response, ALLOWED)
    assert response.json["path"] == received


# --- methods --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "method", "outcome"),
    [
        (["GET"], "GET", ALLOWED),
        (["GET"], "POST", DENIED),
        (["GET"], "HEAD", DENIED),
        (["GET", "HEAD"], "HEAD", ALLOWED),
        (["GET", "HEAD"], "DELETE", DENIED),
        # Methods are case-sensitive tokens: Envoy's HTTP/1 parser answers 400 to `get`
        # before RBAC runs, so no rule can be needed (or written) for it.
        (["GET"], "get", REJECTED),
        (["GET"], "FOO", REJECTED),
    ],
)
def test_method_rules(node: PodsNode, methods: list[str], method: str, outcome: Outcome) -> None:
    apply(node, ingress("web", http_rule(methods=methods)))
    expect(request(node, "/public/x", method=method), outcome, method=method)


# --- hosts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "outcome"),
    [
        ("web.example", "web.example", ALLOWED),
        ("web.example", "WEB.Example", ALLOWED),
        # A port in Host is ignored when matching (use `ports` to match the port).
        ("web.example", "web.example:8080", ALLOWED),
        ("web.example", "web.example:1", ALLOWED),
        ("web.example", "evil.example", DENIED),
        ("web.example", "web.example.evil", DENIED),
        ("web.example", "aweb.example", DENIED),
        ("web.example", "web.example:8080.evil", DENIED),
        # A trailing dot names the same host: Envoy strips it before matching, and the
        # backend sees the host without it.
        ("web.example", "web.example.", ALLOWED),
        ("web.example", "web.example.:8080", ALLOWED),
        ("*.example", "a.example", ALLOWED),
        ("*.example", "A.EXAMPLE:8080", ALLOWED),
        ("*.example", "example", DENIED),
        ("*.example", "a.b.example", DENIED),
        ("*.example", "a.example.evil", DENIED),
    ],
)
def test_host_rules(node: PodsNode, pattern: str, host: str, outcome: Outcome) -> None:
    apply(node, ingress("web", http_rule(hosts=[pattern])))
    response = request(node, "/", headers={"Host": host})
    expect(response, outcome)
    if outcome is ALLOWED:
        assert response.json["host"] == host.replace(".:", ":").rstrip(".")


ADMIN_HOST_DENIED = ingress(
    "web", http_rule("Deny", hosts=["admin.web"]), http_rule(), default="Deny"
)


@pytest.mark.parametrize(
    ("target", "host", "outcome"),
    [
        ("/", "admin.web", DENIED),
        # The attack: a trailing dot used to escape a deny on the host.
        ("/", "admin.web.", DENIED),
        ("/", "ADMIN.WEB.:8080", DENIED),
        # The absolute form names the host in the request line, whatever Host says.
        ("http://admin.web./", "web", DENIED),
        ("http://admin.web/", "web", DENIED),
        ("/", "web", ALLOWED),
    ],
)
def test_a_trailing_dot_does_not_escape_a_host_deny(
    node: PodsNode, target: str, host: str, outcome: Outcome
) -> None:
    apply(node, ADMIN_HOST_DENIED)
    expect(request(node, target, headers={"Host": host}), outcome)


def test_two_host_headers_are_refused(node: PodsNode) -> None:
    """Merged into `web,admin.web`, they would leave the backend to pick one."""
    apply(node, ADMIN_HOST_DENIED)
    expect(request_with_header_lines(node, "/", ["Host: web", "Host: admin.web"]), REJECTED)
    expect(request_with_header_lines(node, "/", ["Host: web"]), ALLOWED)


@pytest.mark.parametrize(
    ("name", "outcome"),
    [("x_internal", REJECTED), ("X_Internal", REJECTED), ("x-internal", DENIED)],
)
def test_header_names_with_underscores_are_refused(
    node: PodsNode, name: str, outcome: Outcome
) -> None:
    """CGI and WSGI backends read `x_internal` as `X-Internal`, the header a rule denies."""
    no_internal = http_rule("Deny", headers=[{"name": "x-internal", "present": True}])
    apply(node, ingress("web", no_internal, default="Allow"))
    expect(request(node, "/", headers={name: "1"}), outcome)


SMUGGLED = b"DELETE /admin HTTP/1.1\r\nHost: web\r\n\r\n"


@pytest.mark.parametrize(
    ("method", "headers", "body", "outcome"),
    [
        # The attack: a body on GET that a backend ignores, then reads as the next request.
        ("GET", {"Content-Length": str(len(SMUGGLED))}, SMUGGLED, REJECTED),
        ("HEAD", {"Content-Length": str(len(SMUGGLED))}, SMUGGLED, REJECTED),
        # A chunked body shows no length in the head: refused once it arrives (413 from the
        # buffer limit on GET and HEAD), before anything is forwarded.
        (
            "GET",
            {"Transfer-Encoding": "chunked"},
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
            TOO_LARGE,
        ),
        # An explicit empty body is harmless, and common.
        ("GET", {"Content-Length": "0"}, b"", ALLOWED),
        ("GET", {}, b"", ALLOWED),
    ],
)
def test_bodies_on_get_and_head_are_refused(
    node: PodsNode, method: str, headers: dict[str, str], body: bytes, outcome: Outcome
) -> None:
    apply(node, ingress("web", http_rule(methods=["GET", "HEAD"], paths=[prefix("/public/")])))
    reply = node.workers["client"].request(
        node.ip("web"), HTTP_PORT, method, "/public/x", list(headers.items()), body=body
    )
    expect(Response(reply.status, reply.body, reply.headers), outcome, method=method)


def test_no_tunnel_past_the_rules(node: PodsNode) -> None:
    """steer configures no upgrades: Envoy refuses a WebSocket upgrade outright (403,
    before any rule, allowed path or not) and CONNECT opens nothing, so no tunnel can
    carry bytes the rules never saw."""
    apply(node, PUBLIC_ONLY)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    for path in ("/public/x", "/admin"):
        refused = request(node, path, headers=upgrade)
        assert (refused.status, refused.body) == (403, b""), refused
        assert refused.from_envoy and not refused.proxied, refused
    tunnel = request(node, f"{node.ip('web')}:{HTTP_PORT}", method="CONNECT")
    assert tunnel.status not in (101, 200), tunnel
    assert tunnel.from_envoy and not tunnel.proxied, tunnel


# --- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "outcome"),
    [
        ({}, ALLOWED),
        ({"x-internal": "1"}, DENIED),
        ({"X-Internal": "yes"}, DENIED),
        # Present with an empty value is still present.
        ({"x-internal": ""}, DENIED),
        ({"x-internal-not": "1"}, ALLOWED),
    ],
)
def test_deny_on_header_presence(node: PodsNode, headers: dict[str, str], outcome: Outcome) -> None:
    no_internal = http_rule("Deny", headers=[{"name": "x-internal", "present": True}])
    apply(node, ingress("web", no_internal, default="Allow"))
    expect(request(node, "/", headers=headers), outcome)


@pytest.mark.parametrize(
    ("lines", "outcome"),
    [
        (["x-team: blue"], ALLOWED),
        (["x-team: "], ALLOWED),
        (["x-team: blue", "x-team: red"], ALLOWED),
        ([], DENIED),
        (["x-teams: blue"], DENIED),
    ],
)
def test_negated_presence_denies_only_a_missing_header(
    node: PodsNode, lines: list[str], outcome: Outcome
) -> None:
    """`present: true, negate: true` is rendered as not_rule(present): it denies exactly the
    requests without the header, however often the header is sent. (`negate` on a value
    match is refused at load time: Envoy matches repeated headers value by value, so
    "x-team is not blue" would let `blue` + `red` through.)"""
    team_required = http_rule("Deny", headers=[{"name": "x-team", "present": True, "negate": True}])
    apply(node, ingress("web", team_required, default="Allow"))
    expect(request_with_header_lines(node, "/", lines), outcome)


# --- egress and ingress together ------------------------------------------------------------

WEB_INGRESS_ALLOWS_ALL = {
    "web-l4-allow-all": ingress("web", default="Allow"),
    "web-l7-allow-all": ingress("web", http_rule()),
}
CLIENT_EGRESS_NO_SECRET = egress(
    "client",
    {
        "action": "Deny",
        "to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
        "ports": [{"port": HTTP_PORT}],
        "http": {"paths": [prefix("/secret")]},
    },
    default="Allow",
)


@pytest.mark.parametrize("web_ingress", sorted(WEB_INGRESS_ALLOWS_ALL))
@pytest.mark.parametrize(
    ("src", "path", "outcome"),
    [
        ("client", "/secret", DENIED),
        ("client", "/secret/../secret", DENIED),
        ("client", "/public/x", ALLOWED),
        # api has no egress policy: the client's egress deny must not reach it.
        ("api", "/secret", ALLOWED),
    ],
)
def test_egress_deny_applies_only_to_its_client(
    node: PodsNode, web_ingress: str, src: str, path: str, outcome: Outcome
) -> None:
    apply(node, CLIENT_EGRESS_NO_SECRET, WEB_INGRESS_ALLOWS_ALL[web_ingress])
    expect(request(node, path, src=src), outcome)


# --- live policy change on a keep-alive connection ------------------------------------------


# Still an HTTP rule for client -> web:8080, so the flow stays behind Envoy: a policy with
# no HTTP rule would make it an L4 deny, and the agent would revoke the connection instead.
NOTHING_PUBLIC = ingress("web", http_rule(paths=[exact("/healthz")]))


@pytest.mark.parametrize(
    ("before", "after", "outcomes"),
    [
        pytest.param(PUBLIC_ONLY, NOTHING_PUBLIC, (ALLOWED, DENIED), id="tightened"),
        pytest.param(NOTHING_PUBLIC, PUBLIC_ONLY, (DENIED, ALLOWED), id="loosened"),
    ],
)
def test_keep_alive_connection_sees_new_verdict_without_reconnecting(
    node: PodsNode, before: Policies, after: Policies, outcomes: tuple[Outcome, Outcome]
) -> None:
    """Rules live in RDS, so a change reaches requests on connections that already exist."""
    apply(node, before)
    client = node.workers["client"]
    conn = client.http_open(node.ip("web"), HTTP_PORT)
    try:
        first = client.http_request(conn, "GET", "/public/x")
        expect(Response(first.status, first.body, first.headers), outcomes[0])
        apply(node, after)
        # The worker never reconnects silently: a closed connection would raise here.
        second = client.http_request(conn, "GET", "/public/x")
        expect(Response(second.status, second.body, second.headers), outcomes[1])
        assert second.local_port == first.local_port
        assert "close" not in (
            first.headers.get("connection", ""),
            second.headers.get("connection", ""),
        )
    finally:
        client.http_close(conn)


# --- L4-only destinations are not proxied ---------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "path", "proxied"),
    [("api", "/anything", False), ("web", "/public/x", True)],
)
def test_only_flows_with_http_rules_go_through_envoy(
    node: PodsNode, dst: str, path: str, proxied: bool
) -> None:
    l4_only_api = ingress(
        "api",
        {
            "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
            "ports": [{"port": HTTP_PORT}],
        },
    )
    apply(node, l4_only_api, PUBLIC_ONLY)
    response = request(node, path, dst=dst)
    expect(response, ALLOWED, pod=dst)
    assert response.proxied is proxied, response.headers
    assert response.from_envoy is proxied, response.headers
    # Envoy connects upstream from the node, so the backend sees the gateway, not the pod.
    assert response.json["peer"] == (LAB_GATEWAY_IP if proxied else node.ip("client"))


# --- another tool removes steer's rules ----------------------------------------------------


def _delete_steer_jumps() -> int:
    """As a careless `iptables -F PREROUTING` would: every jump from a built-in chain into
    steer's chains goes, in the node's namespace."""
    deleted = 0
    table = ""
    for line in _in_node("iptables-legacy-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        words = shlex.split(line)
        target = words[words.index("-j") + 1] if "-j" in words else ""
        if words[:1] == ["-A"] and not words[1].startswith("STEER") and target.startswith("STEER"):
            _in_node("iptables-legacy", "-t", table, "-D", *words[1:])
            deleted += 1
    return deleted


def _in_node(*argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", NODE_NETNS, *argv], check=True, capture_output=True, text=True
    ).stdout


def test_rules_another_tool_removed_are_put_back(node: PodsNode) -> None:
    apply(node, PUBLIC_ONLY)
    expect(request(node, "/admin"), DENIED)
    repairs = (read_status(AGENT_STATUS_FILE) or {}).get("iptables_repairs", 0)
    assert _delete_steer_jumps() > 0
    if node.dataplane == "iptables":
        # The fault is real: with no jump into steer's chains, nothing steers the pod.
        response = request(node, "/admin")
        expect(response, ALLOWED)
        assert not response.proxied
    wait_for(
        lambda: (read_status(AGENT_STATUS_FILE) or {}).get("iptables_repairs", 0) > repairs,
        DRIFT_CHECK_S * 4,
        "the agent to find the deleted jumps",
    )
    wait_for(lambda: "-j STEER" in _in_node("iptables-legacy-save", "-t", "mangle"), 10, "jumps")
    expect(request(node, "/admin"), DENIED)


# --- a bad policy file never changes what is enforced ---------------------------------------

OPEN_WEB_WITH_TYPO = ingress("web", http_rule(pathz=[prefix("/")]), default="Allow")[
    "web-ingress.yaml"
]


@pytest.mark.parametrize(
    "bad_file",
    ["web-ingress.yaml", "zz-open-web.yaml"],
    ids=["bad-edit-of-a-good-file", "new-bad-file"],
)
def test_bad_policy_file_keeps_previous_verdicts_and_is_reported(
    node: PodsNode, bad_file: str
) -> None:
    apply(node, PUBLIC_ONLY)
    expect(request(node, "/admin"), DENIED)
    in_force = texts_digest(directory_texts(node.policy_dir))

    node.write_policies({bad_file: OPEN_WEB_WITH_TYPO}, replace=False)

    # Wait for errors naming this file: after an `apply` that only restored content already
    # in force, the status files may briefly still describe the round before.
    wait_for(lambda: both_report(bad_file), 10, "the bad file to be reported")
    for errors in reported_errors():
        assert len(errors) == 1, errors
        assert f"{node.policy_dir / bad_file}: spec.ingress.rules[0].http.pathz: " in errors[0]
        assert "Extra inputs are not permitted" in errors[0], errors
    assert digests_in_force() == (in_force, in_force)
    expect(request(node, "/admin"), DENIED)
    expect(request(node, "/public/x"), ALLOWED)


def test_emptied_policy_file_keeps_its_policies(node: PodsNode) -> None:
    """An in-place edit starts by truncating the file; that moment must not open the pod."""
    apply(node, PUBLIC_ONLY)
    expect(request(node, "/admin"), DENIED)
    (name,) = PUBLIC_ONLY
    node.write_policies({name: ""}, replace=False)

    def taken() -> bool:
        want = texts_digest(directory_texts(node.policy_dir))
        return digests_in_force() == (want, want)

    wait_for(lambda: taken() or both_report(name), 10, "the emptied file to be processed")
    if taken():
        node.wait_synced()
    expect(request(node, "/admin"), DENIED)
