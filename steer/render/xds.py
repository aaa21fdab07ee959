"""Enforcement -> Envoy resources (listeners, routes, clusters) for one node.

Every HTTP decision lives in RDS as per-route RBAC, never in the listener: a listener change
drains old connections on the old filter chain, so a tightened rule pushed through LDS would
not reach keep-alive connections, while an RDS change does.

Each destination gets its own filter chain and route configuration, so a request is only
ever checked against the rules that can apply to its destination. A request passes when
neither deny filter matches and both allow filters match (docs/policy-reference.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as http_grpc_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.set_metadata.v3 import set_metadata_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from steer.constants import (
    ACCESS_LOG_ALWAYS_FROM_STATUS_KEY,
    ACCESS_LOG_RUNTIME_KEY,
    ALS_CLUSTER,
    ENVOY_INBOUND_PORT,
    ENVOY_OUTBOUND_PORT,
    INBOUND_LISTENER,
    ORIGINAL_DST_CLUSTER,
    OUTBOUND_LISTENER,
    RBAC_FILTERS,
    ROUTE_PREFIX,
)
from steer.model.enforce import (
    Enforcement,
    ManagedPod,
    ResolvedRule,
    Resolver,
    SideRules,
    touched,
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
from steer.model.service import Service, frontends
from steer.model.servicepolicy import ServiceListener, service_listeners


def type_url(message: Message | type[Message]) -> str:
    """The xDS type URL of a message (or message class): what Any and DiscoveryRequests
    name it by."""
    return f"type.googleapis.com/{message.DESCRIPTOR.full_name}"


LISTENER_TYPE = type_url(listener_pb2.Listener)
ROUTE_TYPE = type_url(route_pb2.RouteConfiguration)
CLUSTER_TYPE = type_url(cluster_pb2.Cluster)
ENDPOINT_TYPE = type_url(endpoint_pb2.ClusterLoadAssignment)
HCM_TYPE = type_url(hcm_pb2.HttpConnectionManager)
HCM_FILTER = "envoy.filters.network.http_connection_manager"
BUFFER_FILTER = "envoy.filters.http.buffer"
SET_METADATA_FILTER = "envoy.filters.http.set_metadata"
# The dynamic metadata a Service listener puts on each request: RBAC matches `services`
# on it, and the access log names the Service from it. A client cannot set it.
SERVICE_METADATA = "steer"
_ONE_BYTE = wrappers_pb2.UInt32Value(value=1)
EGRESS_DENY, INGRESS_DENY, EGRESS_ALLOW, INGRESS_ALLOW = RBAC_FILTERS
DEFAULT_DESTINATION = IPv4Network("0.0.0.0/0")

Resources = dict[str, dict[str, Message]]


@dataclass(frozen=True)
class Destination:
    """One filter chain: the prefix it serves and the route configuration behind it."""

    prefix: IPv4Network

    @property
    def route_name(self) -> str:
        return route_name(self.prefix)


def route_name(prefix: IPv4Network) -> str:
    """The route configuration that holds the rules for destinations in `prefix` (a pod's
    /32, or the default chain's): the agent looks for it in Envoy's config_dump."""
    if prefix == DEFAULT_DESTINATION:
        return f"{ROUTE_PREFIX}-default"
    return f"{ROUTE_PREFIX}-{prefix.network_address}-{prefix.prefixlen}"


def _pack(message: Message) -> any_pb2.Any:
    """Any.Pack does not order map entries (RBAC policies are a map), so the same route
    could serialize, and version, differently in two processes; a restarted control plane
    would then resend everything over delta. Serialize deterministically instead."""
    return any_pb2.Any(
        type_url=type_url(message),
        value=message.SerializeToString(deterministic=True),
    )


# --- matchers -----------------------------------------------------------------------------


def _string_matcher(
    exact: str | None = None, prefix: str | None = None, regex: str | None = None
) -> string_pb2.StringMatcher:
    if exact is not None:
        return string_pb2.StringMatcher(exact=exact)
    if prefix is not None:
        return string_pb2.StringMatcher(prefix=prefix)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))


def _any_of(permissions: Sequence[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    if len(permissions) == 1:
        return permissions[0]
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=permissions))


def _all_of(permissions: Sequence[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    if not permissions:
        return rbac_pb2.Permission(any=True)
    if len(permissions) == 1:
        return permissions[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=permissions))


def _header_permission(name: str, matcher: string_pb2.StringMatcher) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(
        header=route_components_pb2.HeaderMatcher(name=name, string_match=matcher)
    )


def _path_permission(path: PathMatch) -> rbac_pb2.Permission:
    matcher = _string_matcher(path.exact, path.prefix, path.regex)
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=matcher))


def _header_rule_permission(header: HeaderMatch) -> rbac_pb2.Permission:
    if header.present:
        permission = rbac_pb2.Permission(
            header=route_components_pb2.HeaderMatcher(name=header.name, present_match=True)
        )
    else:
        permission = _header_permission(
            header.name, _string_matcher(header.exact, header.prefix, header.regex)
        )
    return rbac_pb2.Permission(not_rule=permission) if header.negate else permission


def _service_permission(service: str) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(
        metadata=metadata_pb2.MetadataMatcher(
            filter=SERVICE_METADATA,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key="service")],
            value=value_pb2.ValueMatcher(string_match=_string_matcher(service)),
        )
    )


def http_permissions(match: HTTPMatch, namespace: str) -> list[rbac_pb2.Permission]:
    """`namespace`: the policy's, where a `services` entry without one is looked up."""
    parts: list[rbac_pb2.Permission] = []
    if match.services:
        parts.append(
            _any_of([_service_permission(qualified_service(s, namespace)) for s in match.services])
        )
    if match.methods:
        parts.append(
            _any_of([_header_permission(":method", _string_matcher(m)) for m in match.methods])
        )
    if match.paths:
        parts.append(_any_of([_path_permission(p) for p in match.paths]))
    if match.hosts:
        parts.append(
            _any_of(
                [
                    _header_permission(":authority", _string_matcher(regex=host_regex(h)))
                    for h in match.hosts
                ]
            )
        )
    parts += [_header_rule_permission(h) for h in match.headers]
    return parts


def _port_permission(ports: tuple[tuple[int, int], ...]) -> rbac_pb2.Permission:
    return _any_of(
        [
            rbac_pb2.Permission(destination_port=lo)
            if lo == hi
            else rbac_pb2.Permission(
                destination_port_range=range_pb2.Int32Range(start=lo, end=hi + 1)
            )
            for lo, hi in ports
        ]
    )


@lru_cache(maxsize=1 << 17)
def _cidr(net: IPv4Network) -> address_pb2.CidrRange:
    # Formatting addresses was a third of a cold render. Sharing the message is safe: a
    # field it is put into gets a copy.
    return address_pb2.CidrRange(
        address_prefix=str(net.network_address),
        prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen),
    )


def _ip_principal(nets: Iterable[IPv4Network]) -> rbac_pb2.Principal:
    ids = [rbac_pb2.Principal(direct_remote_ip=_cidr(n)) for n in nets]
    if len(ids) == 1:
        return ids[0]
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


@lru_cache(maxsize=1 << 16)
def _host(ip: IPv4Address) -> IPv4Network:
    # Every render asks for every pod's /32, twice; parsing them was a third of a render.
    return IPv4Network(f"{ip}/32")


# --- RBAC per destination ------------------------------------------------------------------


class RulePolicies:
    """`_rule_policy` results of the last two renders, by rule identity: a re-rendered
    route finds the rules that did not change. Two generations, rotated per render, so
    the cache follows the node: a process-wide LRU of 128k entries held every rule a
    churning cluster ever had (the control plane grew ~13 MB a minute under churn).
    Safe to share the messages: RBAC maps copy what is put into them."""

    def __init__(self) -> None:
        self._old: dict[tuple[int, IPv4Address | None, bool], _Held] = {}
        self._new: dict[tuple[int, IPv4Address | None, bool], _Held] = {}

    def get(
        self, rule: ResolvedRule, subject: IPv4Address | None, *, egress: bool
    ) -> rbac_pb2.Policy | None:
        key = (id(rule), subject, egress)
        held = self._new.get(key) or self._old.get(key)
        if held is None:
            held = (rule, _rule_policy(rule, subject, egress=egress))
        self._new[key] = held
        return held[1]

    def rotate(self) -> None:
        self._old, self._new = self._new, {}


# A rule and its policy: the entry holds the rule alive, so its id stays its own.
_Held = tuple[ResolvedRule, "rbac_pb2.Policy | None"]


def _rule_policy(
    rule: ResolvedRule, subject: IPv4Address | None, *, egress: bool
) -> rbac_pb2.Policy | None:
    """The rule as one RBAC policy; None if its peer list resolved to nothing. `subject`:
    the client, for an egress rule (an ingress rule's policy does not depend on its pod).
    """
    if rule.peers is not None and not rule.peers:
        return None
    permission_parts: list[rbac_pb2.Permission] = []
    if rule.ports is not None:
        permission_parts.append(_port_permission(rule.ports))
    if rule.http is not None:
        permission_parts += http_permissions(rule.http, rule.policy_key.split("/", 1)[0])
    if egress:
        # Egress: the subject is the client, the peers are destinations.
        assert subject is not None
        principal = _ip_principal([_host(subject)])
        if rule.peers is not None:
            permission_parts.insert(
                0, _any_of([rbac_pb2.Permission(destination_ip=_cidr(n)) for n in rule.peers])
            )
    else:
        principal = (
            rbac_pb2.Principal(any=True) if rule.peers is None else _ip_principal(rule.peers)
        )
    return rbac_pb2.Policy(permissions=[_all_of(permission_parts)], principals=[principal])


def rbac_key(pod_key: str, rule: ResolvedRule) -> str:
    """The RBAC policy name of one rule on one pod's side. The rule's position makes it
    unique by construction: a map key seen twice would silently replace a rule."""
    return f"{pod_key}:{rule.policy_key}/{rule.index}/{rule.name}"


# Most routes leave most filters off; the map a route puts it in copies it.
_RBAC_DISABLED = _pack(rbac_filter_pb2.RBACPerRoute())


# Envoy reports the shadow (audit) evaluation of every RBAC filter as dynamic metadata of
# this one namespace, keyed `<prefix>shadow_engine_result` and
# `<prefix>shadow_effective_policy_id`: a prefix per filter keeps their results apart.
RBAC_METADATA = "envoy.filters.http.rbac"
AUDIT_PREFIXES = {
    EGRESS_DENY: "audit_egress_",
    INGRESS_DENY: "audit_ingress_",
    EGRESS_ALLOW: "audit_egress_allow_",
    INGRESS_ALLOW: "audit_ingress_allow_",
}


def _rbac(
    action: int,
    policies: Mapping[str, rbac_pb2.Policy] | None,
    shadow: Mapping[str, rbac_pb2.Policy] | None = None,
    audit_prefix: str = "",
) -> any_pb2.Any:
    """Per-route RBAC; None disables the filter on this route (no restriction applies).
    `shadow`: the policies as if every rule and policy of mode Audit were enforced, which
    Envoy evaluates beside the enforced ones and reports (under `audit_prefix`): a
    difference is recorded, and enforces nothing."""
    if policies is None:
        return _RBAC_DISABLED
    config = rbac_filter_pb2.RBAC(rules=rbac_pb2.RBAC(action=action, policies=dict(policies)))
    if shadow is not None:
        config.shadow_rules.CopyFrom(rbac_pb2.RBAC(action=action, policies=dict(shadow)))
        config.shadow_rules_stat_prefix = audit_prefix
    return _pack(rbac_filter_pb2.RBACPerRoute(rbac=config))


@dataclass
class _SidePolicies:
    deny: dict[str, rbac_pb2.Policy] = field(default_factory=dict)
    allow: dict[str, rbac_pb2.Policy] = field(default_factory=dict)
    audited_deny: dict[str, rbac_pb2.Policy] = field(default_factory=dict)
    # The allows as if the Audit parts were enforced; None where that changes nothing.
    allow_as_if: dict[str, rbac_pb2.Policy] | None = None

    @property
    def deny_as_if(self) -> dict[str, rbac_pb2.Policy] | None:
        return {**self.deny, **self.audited_deny} if self.audited_deny else None


def _side_policies(
    sides: Sequence[SideRules],
    destination: Destination,
    rule_policies: RulePolicies,
    *,
    egress: bool,
) -> _SidePolicies:
    found = _SidePolicies()
    # Built only where enforcing the Audit parts would change the allows: most renders
    # have none, and this runs for every destination.
    audits_allows = any(side.audits_allows for side in sides)
    as_if: dict[str, rbac_pb2.Policy] | None = {} if audits_allows else None
    for side in sides:
        for rule in (*side.rules, *side.audited):
            if (
                egress
                and rule.peers is not None
                and not any(n.overlaps(destination.prefix) for n in rule.peers)
            ):
                continue
            policy = rule_policies.get(rule, side.pod_ip if egress else None, egress=egress)
            if policy is None:
                continue
            key = rbac_key(side.pod_key, rule)
            if rule.action is Action.ALLOW:
                if as_if is not None:
                    as_if[key] = policy
                if not rule.audit:
                    found.allow[key] = policy
            elif not rule.audit:
                found.deny[key] = policy
            elif not rule.audits_l4:  # an audited L4 deny is the flow events' to record
                found.audited_deny[key] = policy
        if side.default_action is Action.ALLOW:
            principal = (
                _ip_principal([_host(side.pod_ip)]) if egress else rbac_pb2.Principal(any=True)
            )
            default = rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)], principals=[principal]
            )
            found.allow[f"{side.pod_key}:default-allow"] = default
            if as_if is not None and side.audit_default_policy_id == 0:
                as_if[f"{side.pod_key}:default-allow"] = default
    found.allow_as_if = as_if
    return found


@dataclass(frozen=True)
class _Sides:
    """What every route configuration of one render needs, computed once per render:
    at 1k pods, recomputing it per destination made rendering quadratic."""

    egress: tuple[SideRules, ...]
    ingress: Mapping[IPv4Address, SideRules]
    unrestricted_clients: rbac_pb2.Policy | None
    rule_policies: RulePolicies

    @classmethod
    def of(cls, enforcement: Enforcement, rule_policies: RulePolicies | None = None) -> _Sides:
        egress = tuple(enforcement.egress[ip] for ip in sorted(enforcement.egress))
        # Clients with no egress policy are unrestricted on the egress side.
        unrestricted = (
            rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)],
                principals=[
                    rbac_pb2.Principal(not_id=_ip_principal(_host(s.pod_ip) for s in egress))
                ],
            )
            if egress
            else None
        )
        return cls(egress, enforcement.ingress, unrestricted, rule_policies or RulePolicies())

    def ingress_of(self, destination: Destination) -> list[SideRules]:
        prefix = destination.prefix
        if prefix == DEFAULT_DESTINATION:
            return []
        if prefix.prefixlen == 32:
            side = self.ingress.get(prefix.network_address)
            return [side] if side is not None else []
        return [side for ip, side in sorted(self.ingress.items()) if ip in prefix]


def _per_filter_config(sides: _Sides, destination: Destination) -> dict[str, any_pb2.Any]:
    allow_action = rbac_pb2.RBAC.Action.ALLOW
    deny_action = rbac_pb2.RBAC.Action.DENY

    egress = _side_policies(sides.egress, destination, sides.rule_policies, egress=True)
    if sides.unrestricted_clients is not None:
        egress.allow["unrestricted-clients"] = sides.unrestricted_clients
        if egress.allow_as_if is not None:
            egress.allow_as_if["unrestricted-clients"] = sides.unrestricted_clients
    ingress_sides = sides.ingress_of(destination)
    ingress = _side_policies(ingress_sides, destination, sides.rule_policies, egress=False)
    found = {
        EGRESS_DENY: (deny_action, egress.deny, egress.deny_as_if, sides.egress),
        INGRESS_DENY: (deny_action, ingress.deny, ingress.deny_as_if, ingress_sides),
        EGRESS_ALLOW: (allow_action, egress.allow, egress.allow_as_if, sides.egress),
        INGRESS_ALLOW: (allow_action, ingress.allow, ingress.allow_as_if, ingress_sides),
    }
    return {
        name: _rbac(action, policies if restricted else None, shadow, AUDIT_PREFIXES[name])
        for name, (action, policies, shadow, restricted) in found.items()
    }


# --- resources -----------------------------------------------------------------------------


def destinations(enforcement: Enforcement) -> list[Destination]:
    pods = sorted({p.ip for p in enforcement.pods})
    return [*(Destination(_host(ip)) for ip in pods), Destination(DEFAULT_DESTINATION)]


def _refusal(
    name: str, headers: Sequence[route_components_pb2.HeaderMatcher]
) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix="/", headers=headers),
        direct_response=route_components_pb2.DirectResponseAction(
            status=400, body=base_pb2.DataSource(inline_string=f"refused by steer: {name}\n")
        ),
        # Refused whatever the rules say: the answer must not depend on the rules.
        typed_per_filter_config=dict.fromkeys(RBAC_FILTERS, _RBAC_DISABLED),
    )


def _header_regex(name: str, regex: str) -> route_components_pb2.HeaderMatcher:
    return route_components_pb2.HeaderMatcher(
        name=name,
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex)),
    )


_BODYLESS = _header_regex(":method", "GET|HEAD")
_CHUNKED = route_components_pb2.HeaderMatcher(name="transfer-encoding", present_match=True)
# Requests no policy can be written for safely, refused before any rule is evaluated (and
# never forwarded): see docs/policy-reference.md "How requests are matched".
REFUSALS: tuple[route_components_pb2.Route, ...] = (
    # Two Host headers arrive merged ("web,other"): which one would the backend use?
    _refusal("several-hosts", [_header_regex(":authority", ".*,.*")]),
    # A body on GET or HEAD is ignored by many servers, which then read it as the next
    # request on the connection: a request smuggled past every rule.
    _refusal("body-on-get-or-head", [_BODYLESS, _header_regex("content-length", "0*[1-9][0-9]*")]),
    _refusal("body-on-get-or-head", [_BODYLESS, _CHUNKED]),
)


_FORWARD = route_components_pb2.RouteAction(
    cluster=ORIGINAL_DST_CLUSTER,
    # Long polls and streams must not be cut by a default 15 s route timeout.
    timeout=duration_pb2.Duration(seconds=0),
)
# A chunked body carries no Content-Length for a route to see, so GET and HEAD go through
# the buffer filter with room for one byte: a body long enough to hold a request is
# refused (413) before anything is forwarded. Other methods never meet the filter.
_BODYLESS_LIMIT = (
    BUFFER_FILTER,
    _pack(buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(max_request_bytes=_ONE_BYTE))),
)
ROUTES: tuple[route_components_pb2.Route, ...] = (
    *REFUSALS,
    route_components_pb2.Route(
        name="get-or-head",
        match=route_components_pb2.RouteMatch(prefix="/", headers=[_BODYLESS]),
        route=_FORWARD,
        typed_per_filter_config=dict([_BODYLESS_LIMIT]),
    ),
    route_components_pb2.Route(
        name="all", match=route_components_pb2.RouteMatch(prefix="/"), route=_FORWARD
    ),
)


def route_configuration(sides: _Sides, destination: Destination) -> route_pb2.RouteConfiguration:
    # The rules sit on the virtual host, once, and every route but the refusals uses them.
    return route_pb2.RouteConfiguration(
        name=destination.route_name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="any-host",
                domains=["*"],
                routes=ROUTES,
                typed_per_filter_config=_per_filter_config(sides, destination),
            )
        ],
    )


@lru_cache(maxsize=1)
def _hcm_template() -> hcm_pb2.HttpConnectionManager:
    """Every filter chain's HCM differs only in its name and route: build the rest once
    (2k HCMs at 1k pods), and copy it, which protobuf does in C."""
    return _build_http_connection_manager("", "")


def _http_connection_manager(stat_prefix: str, route_name: str) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    hcm.CopyFrom(_hcm_template())
    hcm.stat_prefix = stat_prefix
    hcm.rds.route_config_name = route_name
    return hcm


def _agent_access_log() -> accesslog_pb2.AccessLog:
    """Entries go to the agent over gRPC ALS, batched by each worker thread (flushed at
    least every 200 ms): no file write per request. All requests by default."""
    config = http_grpc_pb2.HttpGrpcAccessLogConfig(
        common_config=http_grpc_pb2.CommonGrpcAccessLogConfig(
            log_name="steer",
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=ALS_CLUSTER)
            ),
            transport_api_version=config_source_pb2.ApiVersion.V3,
            buffer_flush_interval=duration_pb2.Duration(nanos=200_000_000),
            # 16 KiB by default (~40 entries): a gRPC message per 40 requests cost the
            # agent more than the entries themselves. Much more (1 MiB, flushed by time)
            # stalls the worker while it serialises a batch: p99 went from 1.3 to 3 ms.
            buffer_size_bytes=wrappers_pb2.UInt32Value(value=64 << 10),
        )
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=_LOGGED_REQUESTS,
        typed_config=_pack(config),
    )


def _audit_would_deny(prefix: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        metadata_filter=accesslog_pb2.MetadataFilter(
            matcher=metadata_pb2.MetadataMatcher(
                filter=RBAC_METADATA,
                path=[
                    metadata_pb2.MetadataMatcher.PathSegment(key=f"{prefix}shadow_engine_result")
                ],
                value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="denied")),
            ),
            # Unset, a request without the key (nearly every one) would be logged.
            match_if_key_not_found=wrappers_pb2.BoolValue(value=False),
        )
    )


# The runtime share samples allowed requests only: a denial or refusal (any status from
# 400 up: 403 from RBAC, 400 from a refusal route or the connection manager, 413 from the
# body check) and an audited would-be denial are logged whatever the share, so an operator
# who samples to save CPU still sees every one. The share comes first: at 100, the default,
# it decides alone.
_LOGGED_REQUESTS = accesslog_pb2.AccessLogFilter(
    or_filter=accesslog_pb2.OrFilter(
        filters=[
            accesslog_pb2.AccessLogFilter(
                runtime_filter=accesslog_pb2.RuntimeFilter(
                    runtime_key=ACCESS_LOG_RUNTIME_KEY,
                    percent_sampled=percent_pb2.FractionalPercent(numerator=100),
                    use_independent_randomness=True,
                )
            ),
            accesslog_pb2.AccessLogFilter(
                status_code_filter=accesslog_pb2.StatusCodeFilter(
                    comparison=accesslog_pb2.ComparisonFilter(
                        op=accesslog_pb2.ComparisonFilter.GE,
                        value=base_pb2.RuntimeUInt32(
                            default_value=400, runtime_key=ACCESS_LOG_ALWAYS_FROM_STATUS_KEY
                        ),
                    )
                )
            ),
            *(_audit_would_deny(prefix) for prefix in AUDIT_PREFIXES.values()),
        ]
    )
)


def _build_http_connection_manager(
    stat_prefix: str, route_name: str
) -> hcm_pb2.HttpConnectionManager:
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )
    filters = [
        # Off unless a route turns it on (the GET and HEAD route does).
        hcm_pb2.HttpFilter(
            name=BUFFER_FILTER,
            typed_config=_pack(buffer_pb2.Buffer(max_request_bytes=_ONE_BYTE)),
            disabled=True,
        ),
        *(
            hcm_pb2.HttpFilter(name=name, typed_config=_pack(rbac_filter_pb2.RBAC()))
            for name in RBAC_FILTERS
        ),
    ]
    filters.append(
        hcm_pb2.HttpFilter(
            name="envoy.filters.http.router",
            typed_config=_pack(
                router_pb2.Router(
                    # Per-response-code and per-zone upstream stats: names looked up in
                    # the symbol table on every response (~6% of Envoy's CPU per request
                    # on the benchmark). steer's own metrics count requests by verdict.
                    dynamic_stats=wrappers_pb2.BoolValue(value=False),
                    # No x-envoy-* headers to the server or the client: they describe the
                    # node's proxy to whoever asks.
                    suppress_envoy_headers=True,
                )
            ),
        )
    )
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        # Every request, allowed or not, to the agent for `steer observe`.
        access_log=[_agent_access_log()],
        codec_type=hcm_pb2.HttpConnectionManager.CodecType.AUTO,
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=ads),
        http_filters=filters,
        # The settings below decide whether a path rule can be bypassed; see
        # docs/policy-reference.md "How requests are matched".
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        # `Host: admin.web.` is the same host as `admin.web`: match (and forward) it so.
        strip_trailing_host_dot=True,
        # No x-request-id invented for a request that has none: nobody reads it (no
        # tracing), and a header Envoy adds is one more a Deny rule's author must think of.
        generate_request_id=wrappers_pb2.BoolValue(value=False),
        # CGI and WSGI backends read `x_internal` as `X-Internal`, a header a rule may
        # deny; a name with an underscore is refused rather than passed on.
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            headers_with_underscores_action=protocol_pb2.HttpProtocolOptions.REJECT_REQUEST
        ),
    )


def _filter_chain(
    stat_prefix: str, destination: Destination
) -> listener_components_pb2.FilterChain:
    hcm = _http_connection_manager(stat_prefix, destination.route_name)
    match = (
        None
        if destination.prefix == DEFAULT_DESTINATION
        else listener_components_pb2.FilterChainMatch(prefix_ranges=[_cidr(destination.prefix)])
    )
    return listener_components_pb2.FilterChain(
        name=destination.route_name,
        filter_chain_match=match,
        filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_pack(hcm))],
    )


def _any_address(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=port)
    )


_ORIGINAL_DST = listener_components_pb2.ListenerFilter(
    name="envoy.filters.listener.original_dst", typed_config=_pack(original_dst_pb2.OriginalDst())
)


def listener(name: str, port: int, wanted: Sequence[Destination]) -> listener_pb2.Listener:
    chains = [_filter_chain(name, d) for d in wanted]
    default = chains.pop()
    return listener_pb2.Listener(
        name=name,
        address=_any_address(port),
        listener_filters=[_ORIGINAL_DST],
        filter_chains=chains,
        default_filter_chain=default,
    )


def listeners(wanted: Sequence[Destination]) -> list[listener_pb2.Listener]:
    return [
        listener(OUTBOUND_LISTENER, ENVOY_OUTBOUND_PORT, wanted),
        listener(INBOUND_LISTENER, ENVOY_INBOUND_PORT, wanted),
    ]


# A Service listener's access log line per request: the Service the client dialled, the
# backend chosen at connect time (the restored destination) and what became of it.
SERVICE_ACCESS_LOG_FORMAT = (
    "steer-service service=%DYNAMIC_METADATA(steer:service)% "
    "port=%DYNAMIC_METADATA(steer:port)% backend=%DOWNSTREAM_LOCAL_ADDRESS% "
    "client=%DOWNSTREAM_REMOTE_ADDRESS% "
    '"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%" '
    "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS%\n"
)


@lru_cache(maxsize=1)
def _service_access_log() -> accesslog_pb2.AccessLog:
    text = substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=SERVICE_ACCESS_LOG_FORMAT)
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout",
        typed_config=_pack(stream_pb2.StdoutAccessLog(log_format=text)),
    )


def _service_tag(listener: ServiceListener) -> hcm_pb2.HttpFilter:
    value = struct_pb2.Struct()
    value.update({"service": listener.service, "port": listener.port_name})
    config = set_metadata_pb2.Config(
        metadata=[set_metadata_pb2.Metadata(metadata_namespace=SERVICE_METADATA, value=value)]
    )
    return hcm_pb2.HttpFilter(name=SET_METADATA_FILTER, typed_config=_pack(config))


def service_listener(
    listener: ServiceListener, wanted: Sequence[Destination]
) -> listener_pb2.Listener:
    """One Service port's listener. Its chains are its backends', each with the route of
    the shared listeners (a backend is enforced the same whichever way it was dialled),
    behind a filter that tags every request with the Service, ahead of RBAC."""
    routed = {d.prefix for d in wanted}
    tag = _service_tag(listener)
    chains = []
    for ip in listener.backends:
        prefix = _host(ip)
        hcm = _http_connection_manager(
            listener.name, route_name(prefix if prefix in routed else DEFAULT_DESTINATION)
        )
        filters = [tag, *hcm.http_filters]
        del hcm.http_filters[:]
        hcm.http_filters.extend(filters)
        hcm.access_log.append(_service_access_log())
        chains.append(
            listener_components_pb2.FilterChain(
                name=f"{listener.name}-{ip}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    prefix_ranges=[_cidr(prefix)]
                ),
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_pack(hcm))],
            )
        )
    return listener_pb2.Listener(
        name=listener.name,
        address=_any_address(listener.envoy_port),
        listener_filters=[_ORIGINAL_DST],
        # No default chain: a flow whose backend is not this Service's is closed rather
        # than tagged with a Service it never dialled.
        filter_chains=chains,
    )


def original_dst_cluster() -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=ORIGINAL_DST_CLUSTER,
        type=cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.LbPolicy.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=2),
    )


@dataclass
class XdsCache:
    """Resources of the previous render, for a caller that renders again and again (the
    control plane). Listeners depend only on the set of destinations. A destination's
    route depends only on every pod's egress side and its own ingress side: while those
    are the same, the previous message is reused, so a change to one pod's policy
    rebuilds one route, not a thousand. Reused messages are the same objects, which lets
    the snapshot cache skip re-encoding them."""

    egress: tuple[SideRules, ...] | None = None
    # destination -> (the ingress sides it was rendered from, the route)
    routes: dict[Destination, tuple[list[SideRules], route_pb2.RouteConfiguration]] = field(
        default_factory=dict
    )
    destinations: list[Destination] | None = None
    listeners: list[listener_pb2.Listener] = field(default_factory=list)
    # The steered pods the destinations were derived from (the Resolver's tuple), and
    # their addresses.
    pods: tuple[ManagedPod, ...] | None = None
    addresses: tuple[IPv4Address, ...] | None = None
    rule_policies: RulePolicies = field(default_factory=RulePolicies)
    # The last render's routes by name, with the resolution and destinations they are for
    # (never changed in place once handed out).
    named: tuple[Enforcement, list[Destination], dict[str, route_pb2.RouteConfiguration]] | None = (
        None
    )

    def route(self, sides: _Sides, destination: Destination) -> route_pb2.RouteConfiguration:
        ingress = sides.ingress_of(destination)
        cached = self.routes.get(destination)
        if cached is not None and cached[0] == ingress:
            return cached[1]
        route = route_configuration(sides, destination)
        self.routes[destination] = (ingress, route)
        return route

    def destinations_and_listeners(
        self, enforcement: Enforcement
    ) -> tuple[list[Destination], list[listener_pb2.Listener]]:
        if self.destinations is None or enforcement.pods is not self.pods:
            # Destinations follow the pods' addresses alone: a relabelled pod keeps them.
            addresses = tuple(p.ip for p in enforcement.pods)
            if self.destinations is None or addresses != self.addresses:
                wanted = destinations(enforcement)
                if wanted != self.destinations:
                    self.destinations, self.listeners = wanted, listeners(wanted)
                self.addresses = addresses
            self.pods = enforcement.pods
        assert self.destinations is not None
        return self.destinations, self.listeners

    def start(self, sides: _Sides) -> bool:
        """False if the egress sides changed: every route is then rendered again."""
        if self.egress != sides.egress:
            self.egress = sides.egress
            self.routes.clear()
            return False
        return True

    def routes_of(
        self, enforcement: Enforcement, sides: _Sides, wanted: list[Destination]
    ) -> dict[str, route_pb2.RouteConfiguration]:
        """Every destination's route by name. With the egress sides and the destinations
        as they were at the last render, only the routes of the addresses whose ingress
        side (or pod) changed are looked at: a thousand lookups per change were most of a
        render at 1k pods."""
        same_egress = self.start(sides)
        last = self.named
        if same_egress and last is not None and last[1] is wanted:
            scope = touched(last[0], enforcement)
            if scope is not None:
                routes = dict(last[2])
                for ip in scope.destinations:
                    destination = Destination(_host(ip))
                    if destination.route_name in routes:
                        routes[destination.route_name] = self.route(sides, destination)
                self.named = (enforcement, wanted, routes)
                return routes
        routes = {d.route_name: self.route(sides, d) for d in wanted}
        # Forget destinations that are gone, so the cache does not grow with churn.
        for gone in set(self.routes) - set(wanted):
            del self.routes[gone]
        self.named = (enforcement, wanted, routes)
        return routes


def render_resources(
    enforcement: Enforcement,
    cache: XdsCache | None = None,
    services: Sequence[ServiceListener] = (),
) -> Resources:
    """Pure in effect: with a cache the result is equal to a render without one."""
    sides = _Sides.of(enforcement, cache.rule_policies if cache is not None else None)
    routes: dict[str, route_pb2.RouteConfiguration]
    if cache is None:
        wanted = destinations(enforcement)
        listener_list = listeners(wanted)
        routes = {d.route_name: route_configuration(sides, d) for d in wanted}
    else:
        wanted, listener_list = cache.destinations_and_listeners(enforcement)
        routes = cache.routes_of(enforcement, sides, wanted)
        cache.rule_policies.rotate()
    listener_list = [*listener_list, *(service_listener(s, wanted) for s in services)]
    return {
        LISTENER_TYPE: {r.name: r for r in listener_list},
        ROUTE_TYPE: routes,
        CLUSTER_TYPE: {ORIGINAL_DST_CLUSTER: original_dst_cluster()},
    }


class SnapshotRenderer:
    """Policies and pods -> one node's resources, again and again: `render` equals
    `render_resources(resolve(policies, pods, local))`, at the cost of what changed since
    the previous call."""

    def __init__(self, local: Callable[[Pod], bool] | None = None) -> None:
        self._resolver = Resolver(local)
        self._cache = XdsCache()

    def render(
        self,
        policies: Sequence[HTTPPolicy],
        pods: Sequence[Pod],
        services: Sequence[Service] = (),
    ) -> tuple[Enforcement, Resources]:
        enforcement = self._resolver.resolve(policies, pods)
        found, _ = frontends(services)
        listeners = service_listeners(enforcement, found)
        ordered = [listeners[key] for key in sorted(listeners)]
        return enforcement, render_resources(enforcement, self._cache, ordered)
