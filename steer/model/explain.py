"""`steer explain`: what the node does with one request from a pod to a pod, and why. Pure.

Nothing here is a second policy engine. The L4 verdict is `deciding_sides`, the function
every datapath's render is built from. The HTTP verdict walks the RBAC filters the xDS
renderer gives the destination's route, in their order (egress deny, ingress deny, egress
allow, ingress allow: steer.render.xds), over the same resolved rules, matching a request
the way Envoy does once its connection manager has normalised it (path normalisation,
merged slashes, trailing host dot, refused escapes and underscores: the settings in
`steer.render.xds._build_http_connection_manager`). A test sends the requests for real,
over random policies, and checks that explain agrees with Envoy and the kernel.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import re2

from steer.constants import VERDICT_DENY, VERDICT_L7
from steer.model.enforce import (
    Enforcement,
    ResolvedRule,
    SideRules,
    deciding_sides,
    exclusion_skips_envoy,
    resolve,
)
from steer.model.pod import Pod
from steer.model.policy import (
    Action,
    HeaderMatch,
    HTTPMatch,
    HTTPPolicy,
    PathMatch,
    host_regex,
    qualified_service,
)

ALLOWED, DENIED, REFUSED = "allowed", "denied", "refused"


@dataclass(frozen=True)
class HTTPRequest:
    method: str = "GET"
    path: str = "/"
    host: str = ""
    # (name, value) pairs; a name given twice is a header sent twice.
    headers: tuple[tuple[str, str], ...] = ()
    # "namespace/name" when the client dialled the destination through that Service.
    service: str | None = None


@dataclass(frozen=True)
class Explanation:
    dataplane: str | None  # the source's datapath, when the agent reported one
    l4: str  # allowed | denied
    via_envoy: bool
    http: str | None  # allowed | denied | refused (400, before any rule); None: no Envoy
    policy: str | None  # namespace/name of the policy that decided, None: no policy applies
    rule: str | None  # its rule's name, or default-allow / default-deny
    reason: str

    @property
    def status(self) -> int | None:
        """What the client gets from steer: None for a refused connect, or for an answer
        that is the server's own (200 here)."""
        if self.l4 == DENIED:
            return None
        if self.http == DENIED:
            return 403
        if self.http == REFUSED:
            return 400
        return 200

    def to_json(self) -> dict[str, Any]:
        return {
            "dataplane": self.dataplane,
            "l4": self.l4,
            "via_envoy": self.via_envoy,
            "http": self.http,
            "policy": self.policy,
            "rule": self.rule,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class _Decided:
    """Which rule of which side decided; `rule` None: the side's default action."""

    side: SideRules | None
    rule: ResolvedRule | None


def explain(
    enforcement: Enforcement,
    src: IPv4Address,
    dst: IPv4Address,
    port: int,
    request: HTTPRequest,
    *,
    dataplane: str | None = None,
) -> Explanation:
    """The verdicts for `request` from `src` to `dst:port` under `enforcement`."""
    kind, decided = _l4(enforcement, src, dst, port)

    def result(**fields: Any) -> Explanation:
        return Explanation(dataplane=dataplane, **fields)

    if kind == VERDICT_DENY:
        return result(
            l4=DENIED,
            via_envoy=False,
            http=None,
            **_named(decided, enforcement),
            reason="the connect is refused: " + _why(decided, "denies"),
        )
    if kind != VERDICT_L7:
        return result(
            l4=ALLOWED,
            via_envoy=False,
            http=None,
            **_named(decided, enforcement),
            reason="no HTTP rule covers the flow: it goes straight to the server, no Envoy",
        )
    source, destination = enforcement.pod_by_ip(src), enforcement.pod_by_ip(dst)
    if source is not None and exclusion_skips_envoy(
        source,
        dst,
        port,
        dst_pod=destination,
        egress=enforcement.egress.get(src),
        ingress=enforcement.ingress.get(dst),
    ):
        return result(
            l4=ALLOWED,
            via_envoy=False,
            http=None,
            policy=None,
            rule=None,
            reason="an exclusion annotation takes the flow past Envoy: no HTTP rule applies",
        )
    refusal = _refusal(request)
    if refusal is not None:
        return result(
            l4=ALLOWED, via_envoy=True, http=REFUSED, policy=None, rule=None, reason=refusal
        )
    normal = _normalised(request)
    http = _rbac(enforcement, src, dst, port, normal)
    return result(
        l4=ALLOWED,
        via_envoy=True,
        http=DENIED if http.denied else ALLOWED,
        **_named(http.decided, enforcement),
        reason=http.reason,
    )


def l4_verdict(
    enforcement: Enforcement, src: IPv4Address, dst: IPv4Address, port: int
) -> tuple[int, str | None, str | None]:
    """The flow's L4 verdict (VERDICT_*), with the policy and rule that decide it."""
    kind, decided = _l4(enforcement, src, dst, port)
    named = _named(decided, enforcement)
    return kind, named["policy"], named["rule"]


def l4_audit(
    enforcement: Enforcement, src: IPv4Address, dst: IPv4Address, port: int
) -> tuple[str, str] | None:
    """(policy, rule) that would deny the flow if every policy and rule of mode Audit were
    enforced, where the enforcement lets it by; None otherwise."""
    as_if = enforcement.as_if
    if as_if is None or _l4(enforcement, src, dst, port)[0] == VERDICT_DENY:
        return None
    kind, decided = _l4(as_if, src, dst, port)
    if kind != VERDICT_DENY:
        return None
    named = _named(decided, as_if)
    return named["policy"] or "", named["rule"] or ""


def audit_default(
    enforcement: Enforcement, src: IPv4Address, dst: IPv4Address, *, egress: bool
) -> tuple[str, str] | None:
    """(policy, rule) of the default Deny of a policy of mode Audit on the client's egress
    side (or the server's ingress side): what would deny a request no allow covers."""
    side = enforcement.egress.get(src) if egress else enforcement.ingress.get(dst)
    if side is None or side.audit_default_policy_id == 0:
        return None
    policy = enforcement.policy_key(side.audit_default_policy_id)
    return (policy, "default-deny") if policy is not None else None


def _l4(
    enforcement: Enforcement, src: IPv4Address, dst: IPv4Address, port: int
) -> tuple[int, _Decided]:
    """The flow's verdict, and the side and rule that decide it (`deciding_sides`)."""
    egress, ingress = enforcement.egress.get(src), enforcement.ingress.get(dst)
    kind, side, rule = deciding_sides(egress, ingress, src, dst, port)
    return kind, _Decided(side, rule)


class UnknownPod(KeyError):
    pass


def explain_pods(
    policies: Sequence[HTTPPolicy],
    pods: Sequence[Pod],
    source: str,
    to: tuple[str, int],
    request: HTTPRequest,
    *,
    dataplane: str | None = None,
) -> Explanation:
    """`explain` from the pod `source` to the pod and port `to`, pods named
    "namespace/name"; UnknownPod for a name that is none of `pods`."""
    destination, port = to
    by_key = {p.key: p for p in pods}
    for key in (source, destination):
        if key not in by_key:
            raise UnknownPod(key)
    return explain(
        resolve(policies, pods),
        IPv4Address(by_key[source].ip),
        IPv4Address(by_key[destination].ip),
        port,
        request,
        dataplane=dataplane,
    )


def _named(decided: _Decided, enforcement: Enforcement) -> dict[str, str | None]:
    if decided.rule is not None:
        return {"policy": decided.rule.policy_key, "rule": decided.rule.name}
    if decided.side is None:
        return {"policy": None, "rule": None}
    action = "allow" if decided.side.default_action is Action.ALLOW else "deny"
    return {
        "policy": enforcement.policy_key(decided.side.default_policy_id),
        "rule": f"default-{action}",
    }


def _why(decided: _Decided, verb: str) -> str:
    if decided.rule is not None:
        return f"rule {decided.rule.name} of {decided.rule.policy_key} {verb} it"
    if decided.side is None:
        return "no policy applies"
    return f"no rule of {decided.side.pod_key}'s {decided.side.direction} policy matches"


# --- HTTP, as Envoy sees the request --------------------------------------------------------

_ESCAPED_SLASH = re.compile(r"%(2f|5c)", re.IGNORECASE)
_ESCAPED_DOT = re.compile(r"%2e", re.IGNORECASE)


def _refusal(request: HTTPRequest) -> str | None:
    """Why Envoy answers 400 before any rule runs, if it does."""
    if _ESCAPED_SLASH.search(request.path.split("?", 1)[0]):
        return "an escaped slash or backslash (%2F, %5C) in the path: refused with 400"
    if any("_" in name for name, _ in request.headers):
        return "a header name with an underscore: refused with 400"
    return None


@dataclass(frozen=True)
class _Normal:
    method: str
    path: str
    authority: str
    headers: dict[str, list[str]]
    service: str | None


def _normalised(request: HTTPRequest) -> _Normal:
    headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        headers.setdefault(name.lower(), []).append(value)
    return _Normal(
        request.method,
        normalise_path(request.path),
        _strip_host_dot(request.host.lower()),
        headers,
        request.service,
    )


def normalise_path(path: str) -> str:
    """The path as Envoy matches it: without the query, backslashes as slashes, `.` and
    `..` segments (plain or %2E) resolved (RFC 3986, 5.2.4), then repeated slashes merged
    (normalize_path runs before merge_slashes)."""
    path = _ESCAPED_DOT.sub(".", path.split("?", 1)[0].replace("\\", "/"))
    if not path.startswith("/"):
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
            continue
        if last:
            out.append("")  # `/a/b/..` is the directory `/a/`
    return re.sub("/{2,}", "/", "/" + "/".join(out))


def _strip_host_dot(host: str) -> str:
    name, colon, port = host.rpartition(":") if ":" in host else (host, "", "")
    return f"{name.rstrip('.')}{colon}{port}" if colon else host.rstrip(".")


@dataclass(frozen=True)
class _HttpVerdict:
    denied: bool
    decided: _Decided
    reason: str


def _rbac(
    enforcement: Enforcement, src: IPv4Address, dst: IPv4Address, port: int, request: _Normal
) -> _HttpVerdict:
    """The four RBAC filters of the destination's route, in the order they run. A DENY
    filter stops at a matching rule; an ALLOW filter stops when no rule matches."""
    egress, ingress = enforcement.egress.get(src), enforcement.ingress.get(dst)
    for side, peer in ((egress, dst), (ingress, src)):
        if side is None:
            continue
        rule = _first(side, Action.DENY, peer, port, request)
        if rule is not None:
            return _HttpVerdict(
                True, _Decided(side, rule), f"HTTP 403: rule {rule.name} of {rule.policy_key}"
            )
    matched: _Decided = _Decided(None, None)
    for side, peer in ((egress, dst), (ingress, src)):
        if side is None:
            continue  # a client without egress policy, a server without ingress: no limit
        rule = _first(side, Action.ALLOW, peer, port, request)
        if rule is None and side.default_action is not Action.ALLOW:
            return _HttpVerdict(
                True,
                _Decided(side, None),
                f"HTTP 403: no allow rule of {side.pod_key}'s {side.direction} policy matches",
            )
        matched = _Decided(side, rule)
    return _HttpVerdict(False, matched, "HTTP allowed: Envoy forwards it to the server")


def _first(
    side: SideRules, action: Action, peer: IPv4Address, port: int, request: _Normal
) -> ResolvedRule | None:
    for rule in side.rules:
        # An audited rule enforces nothing (steer observe records what it would deny).
        if rule.action is action and not rule.audit and rule.matches(peer, port):
            namespace = rule.policy_key.split("/", 1)[0]
            if rule.http is None or _http_matches(rule.http, request, namespace):
                return rule
    return None


def _http_matches(match: HTTPMatch, request: _Normal, namespace: str) -> bool:
    if match.methods and request.method not in match.methods:
        return False
    if match.paths and not any(_path_matches(p, request.path) for p in match.paths):
        return False
    if match.hosts and not any(
        re2.fullmatch(host_regex(h), request.authority) for h in match.hosts
    ):
        return False
    if match.services and request.service not in {
        qualified_service(s, namespace) for s in match.services
    }:
        return False
    return all(_header_matches(h, request.headers.get(h.name, [])) for h in match.headers)


def _path_matches(match: PathMatch, path: str) -> bool:
    return _string_matches(match.exact, match.prefix, match.regex, path)


def _string_matches(exact: str | None, prefix: str | None, regex: str | None, value: str) -> bool:
    """One of exact, prefix or regex (the whole value, RE2), as Envoy's StringMatcher."""
    if exact is not None:
        return value == exact
    if prefix is not None:
        return value.startswith(prefix)
    return regex is not None and re2.fullmatch(regex, value) is not None


def _header_matches(match: HeaderMatch, values: Sequence[str]) -> bool:
    if match.present:
        return bool(values) != match.negate
    return any(_string_matches(match.exact, match.prefix, match.regex, v) for v in values)
