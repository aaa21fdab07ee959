"""The HTTPPolicy schema, defined once.

The same models validate local YAML files and (later) generate the CRD's OpenAPI schema,
so the two can never drift. Every validator phrases its error as "what is wrong; fix:
what to write instead", because the message is shown to the operator verbatim.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Literal, TypeVar

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# Methods Envoy's HTTP/1 parser accepts; anything else is answered 400 before any filter
# runs, so a rule naming it could never match and is almost certainly a typo.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# Each pattern validates a whole value, so it is only ever used with `fullmatch`: with
# `match` and `$`, a value ending in a newline would pass (`$` matches before it).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
# The names the resolver gives unnamed rules (`ingress[0]`, `egress[3]`): reserved, so a
# given name can never collide with one.
_DEFAULT_RULE_NAME = re.compile(r"(ingress|egress)\[[0-9]+\]")

# Regexes are checked by RE2 itself, compiled as Envoy compiles them (default options,
# UTF-8, errors not logged), so that what loads here is what Envoy accepts.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
# Envoy refuses a regex whose RE2 program (the forward one, `RE2::ProgramSize()`) is
# larger than the runtime value `re2.max_program_size.error_level`, 100 by default.
ENVOY_MAX_PROGRAM_SIZE = 100
# RE2 repeats at most 1000 times.
RE2_MAX_REPEAT = 1000
# A brace that looks like a repetition, for those RE2 reads as literal text instead.
_BRACES = re.compile(r"\{([0-9]*)(?:,([0-9]*))?\}")


class StrictModel(BaseModel):
    """Unknown fields are errors: a misspelt key must not silently widen a policy."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class Direction(StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class SelectorRequirement(StrictModel):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _values_fit_operator(self) -> SelectorRequirement:
        needs_values = self.operator in ("In", "NotIn")
        if needs_values and not self.values:
            raise ValueError(f"operator {self.operator} needs values; fix: list at least one")
        if not needs_values and self.values:
            raise ValueError(f"operator {self.operator} takes no values; fix: remove `values`")
        return self


class LabelSelector(StrictModel):
    """Kubernetes label selector; the empty selector selects every pod."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[SelectorRequirement, ...] = Field(default=(), alias="matchExpressions")

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and labels.get(req.key) not in req.values:
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


class Peer(StrictModel):
    """Exactly one of `cidr` or `podSelector` (pods in the policy's namespace)."""

    cidr: str | None = None
    pod_selector: LabelSelector | None = Field(default=None, alias="podSelector")

    @model_validator(mode="after")
    def _exactly_one(self) -> Peer:
        if (self.cidr is None) == (self.pod_selector is None):
            raise ValueError(
                "a peer needs exactly one of `cidr` or `podSelector`; fix: split it into two "
                "peers, or add the missing one"
            )
        return self

    @field_validator("cidr")
    @classmethod
    def _valid_cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"{value!r} is not a valid IPv4 CIDR ({exc}); fix: write it like 10.0.0.0/8, "
                "with no bits set past the prefix"
            ) from None
        if net.version != 4:
            raise ValueError(f"{value!r} is IPv6; fix: steer enforces IPv4 only for now")
        return str(net)


class PortSpec(StrictModel):
    # Strict: YAML turns `on`/`yes` into true, which a lax int would read as port 1.
    port: StrictInt
    end_port: StrictInt | None = Field(default=None, alias="endPort")
    protocol: Literal["TCP"] = "TCP"

    @field_validator("port", "end_port")
    @classmethod
    def _in_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 65535:
            raise ValueError(f"port {value} is out of range; fix: use 1-65535")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> PortSpec:
        if self.end_port is not None and self.end_port < self.port:
            raise ValueError(
                f"endPort {self.end_port} is below port {self.port}; fix: endPort >= port"
            )
        return self

    @property
    def range(self) -> tuple[int, int]:
        return (self.port, self.end_port if self.end_port is not None else self.port)


_RE2_FIXES = (
    # (RE2's reason, from its error text; what to write instead)
    ("invalid perl operator: (?=", "RE2 has no lookahead; rewrite it without (?=...)"),
    ("invalid perl operator: (?!", "RE2 has no lookahead; rewrite it without (?!...)"),
    ("invalid perl operator: (?<=", "RE2 has no lookbehind; rewrite it without (?<=...)"),
    ("invalid perl operator: (?<!", "RE2 has no lookbehind; rewrite it without (?<!...)"),
    ("invalid perl operator: (?#", "RE2 has no (?#...) comments; remove the comment"),
    ("invalid perl operator: (?>", "RE2 has no atomic groups; write (?:...)"),
    ("invalid perl operator: (?P=", "RE2 has no backreferences; rewrite it without them"),
    ("invalid perl operator", "RE2's only flags are i, m, s and U, as in (?i)"),
    ("invalid escape sequence: \\Z", "write $ (without the m flag it matches only at the end)"),
    ("invalid escape sequence: \\u", "write the character itself, or \\x{41}"),
    (
        "invalid escape sequence: \\",
        "RE2 has no such escape (nor backreferences); see RE2's syntax",
    ),
    ("bad repetition operator", "RE2 has no possessive quantifiers (*+, ++, ?+); drop the +"),
    ("invalid repetition size", f"repeat at most {RE2_MAX_REPEAT} times"),
    ("pattern too large", "simplify the pattern"),
    ("missing ]", "close the character class with ]"),
    ("missing )", "close the group with )"),
    ("unexpected )", "remove the ) or open its group"),
)


def _check_regex(value: str) -> str:
    """`value` if Envoy's RE2 accepts it, else a ValueError that says why and the fix."""
    _check_utf8(value, "regex")
    if not value:
        raise ValueError("regex '' is empty, which Envoy refuses; fix: write '.*' to match any")
    try:
        compiled = re2.compile(value, _RE2_OPTIONS)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else exc
        reason = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        fix = next((f for r, f in _RE2_FIXES if r in reason), "see RE2's syntax")
        raise ValueError(
            f"regex {_shown(value)} is refused by RE2 ({reason}); fix: {fix}"
        ) from None
    size = int(compiled.programsize)
    if size > ENVOY_MAX_PROGRAM_SIZE:
        raise ValueError(
            f"regex {_shown(value)} compiles to an RE2 program of size {size}, over "
            f"Envoy's limit of {ENVOY_MAX_PROGRAM_SIZE} (runtime "
            "re2.max_program_size.error_level), so Envoy would refuse it; fix: simplify "
            "it (fewer and smaller repeats and alternatives; \\pL-style Unicode classes "
            "are large), or match a prefix instead"
        )
    if (brace := _literal_braces(value)) is not None:
        raise ValueError(
            f"regex {_shown(value)} has {brace!r}, which RE2 reads as literal text, not as a "
            f"repetition; fix: write a count from 0 to {RE2_MAX_REPEAT} (as {{0,n}}, not "
            "{,n}), or escape the brace as \\{ to match it literally"
        )
    return value


def _shown(value: str, limit: int = 80) -> str:
    """`value` quoted for an error message, cut short if long: a hostile 3 MiB regex
    must not become a 3 MiB log line."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"


def _literal_braces(pattern: str) -> str | None:
    """The first `{n}`, `{n,}`, `{,m}` or `{n,m}` outside a class that RE2 takes as
    literal text (a count over its limit, a missing minimum, a leading zero), or None.
    Only called on patterns RE2 accepted, so every count it did read is in range."""
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if pattern.startswith("\\Q", i):  # \Q...\E quotes literally
                end = pattern.find("\\E", i + 2)
                i = len(pattern) if end < 0 else end + 2
            else:
                i += 2
            continue
        if in_class:
            if char == "[" and pattern.startswith("[:", i):  # [:alpha:]
                end = pattern.find(":]", i + 2)
                i = i + 1 if end < 0 else end + 2
                continue
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 1
            i += pattern.startswith("^", i)
            i += pattern.startswith("]", i)  # a leading ] is a member
            continue
        elif char == "{" and (m := _BRACES.match(pattern, i)) is not None:
            counts = [c for c in (m[1], m[2]) if c]
            if (m[2] is not None and not m[1]) or any(
                len(c) > 4 or (len(c) > 1 and c[0] == "0") or int(c) > RE2_MAX_REPEAT
                for c in counts
            ):
                return m[0]
        i += 1
    return None


def _check_utf8(value: str, what: str) -> str:
    """Every string steer sends Envoy must be valid UTF-8; JSON and YAML escapes can spell
    a lone surrogate ("\\ud800"), which no protobuf message can carry."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} {_shown(value)} holds a lone surrogate, not valid Unicode; fix: write the "
            "character itself"
        ) from None
    return value


def _check_normal_path(value: str, what: str) -> str:
    """Rules are written against the path Envoy matches: already normalised."""
    _check_utf8(value, what)
    if "\\" in value:
        raise ValueError(
            f"{what} {value!r} is not normalised: requests have each backslash turned into "
            "'/' before matching; fix: write '/' (this rule could never match)"
        )
    if not value.startswith("/"):
        raise ValueError(f"{what} {value!r} must start with '/'; fix: write '/{value}'")
    if "?" in value or "#" in value:
        raise ValueError(
            f"{what} {value!r} contains a query or fragment; fix: match the path only "
            "(query strings are never matched)"
        )
    segments = value.split("/")
    if "//" in value or any(s in (".", "..") for s in segments[1:]):
        raise ValueError(
            f"{what} {value!r} is not normalised; fix: remove dot segments and repeated "
            "slashes (requests are normalised before matching, so this could never match)"
        )
    if re.search(r"%(2[fF]|5[cC]|2[eE])", value):
        raise ValueError(
            f"{what} {value!r} contains an encoded '/', '\\' or '.'; fix: write the decoded "
            "path (such requests are rejected before matching)"
        )
    return value


class PathMatch(StrictModel):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PathMatch:
        given = [v for v in (self.exact, self.prefix, self.regex) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "a path match needs exactly one of `exact`, `prefix` or `regex`; fix: keep "
                "one per list entry"
            )
        if self.exact is not None:
            _check_normal_path(self.exact, "exact path")
        if self.prefix is not None:
            _check_normal_path(self.prefix, "path prefix")
        if self.regex is not None:
            _check_regex(self.regex)
        return self


class HeaderMatch(StrictModel):
    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    # Only with `present`: rendered as an RBAC not_rule, it means "header absent".
    negate: bool = False

    @field_validator("name")
    @classmethod
    def _lowercase_token(cls, value: str) -> str:
        if value.startswith(":"):
            raise ValueError(
                f"header {value!r} is a pseudo-header; fix: use `methods`, `paths` or `hosts`"
            )
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError(
                f"header name {value!r} is not a lowercase HTTP token; fix: write {value.lower()!r}"
                if value.lower() != value
                else f"header name {value!r} has characters HTTP forbids in names; fix: use "
                "letters, digits and - only"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> HeaderMatch:
        given = [v for v in (self.exact, self.prefix, self.regex, self.present) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "a header match needs exactly one of `exact`, `prefix`, `regex` or "
                "`present`; fix: keep one, and list the header again for another condition"
            )
        if self.present is False:
            raise ValueError("`present: false` is ambiguous; fix: `present: true, negate: true`")
        if self.negate and self.present is None:
            # Envoy matches a repeated header value by value, so "x-team is not blue"
            # would be false for `x-team: blue` + `x-team: red` and the red value would pass.
            raise ValueError(
                "`negate` works with `present: true` only: a header sent twice is matched "
                "value by value, so a negated value match can be escaped; fix: match the "
                "allowed value in an Allow rule (with defaultAction: Deny), or deny the "
                "unwanted value with a Deny rule"
            )
        if self.regex is not None:
            _check_regex(self.regex)
        if self.exact is not None:
            _check_utf8(self.exact, "header value")
        if self.prefix is not None:
            _check_utf8(self.prefix, "header prefix")
            if not self.prefix:
                raise ValueError(
                    "header prefix '' is empty, which Envoy refuses; fix: `present: true` "
                    "matches any value"
                )
        return self


class HTTPMatch(StrictModel):
    """All given fields must match (AND); within a list any entry may match (OR)."""

    methods: tuple[str, ...] = ()
    paths: tuple[PathMatch, ...] = ()
    hosts: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    # The Service the client dialled ("name" in the policy's namespace, or
    # "namespace/name"): a request that reached the pod by its own address matches none.
    services: tuple[str, ...] = ()

    @field_validator("services")
    @classmethod
    def _service_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for service in value:
            parts = service.split("/")
            if len(parts) > 2 or not all(
                len(part) <= 63 and _DNS_LABEL.fullmatch(part) for part in parts
            ):
                raise ValueError(
                    f"service {_shown(service)} is not a Service name; fix: write 'name' "
                    "for a Service in the policy's namespace, or 'namespace/name'"
                )
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for method in value:
            if method not in HTTP_METHODS:
                hint = (
                    f"write {method.upper()!r} (methods are case-sensitive)"
                    if method.upper() in HTTP_METHODS
                    else f"use one of {', '.join(sorted(HTTP_METHODS))}"
                )
                raise ValueError(f"unknown HTTP method {method!r}; fix: {hint}")
        return value

    @field_validator("hosts")
    @classmethod
    def _valid_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if ":" in host:
                raise ValueError(
                    f"host {host!r} has a port; fix: write the name only (ports in the Host "
                    "header are ignored when matching; use `ports` to match the port)"
                )
            if len(host) > 253 or not _HOST.fullmatch(host.lower()):
                raise ValueError(
                    f"host {_shown(host)} is not a DNS name or '*.'-wildcard; fix: e.g. "
                    "'api.example.com' or '*.example.com'"
                )
            size = int(re2.compile(host_regex(host.lower()), _RE2_OPTIONS).programsize)
            if size > ENVOY_MAX_PROGRAM_SIZE:
                raise ValueError(
                    f"host {_shown(host)} is too long: Envoy matches it with a regex whose "
                    f"RE2 program size {size} is over Envoy's limit of "
                    f"{ENVOY_MAX_PROGRAM_SIZE}; fix: a shorter name, or a '*.'-wildcard"
                )
        return tuple(h.lower() for h in value)


def qualified_service(service: str, namespace: str) -> str:
    """A `services` entry as "namespace/name", the policy's namespace by default."""
    return service if "/" in service else f"{namespace}/{service}"


def host_regex(host: str) -> str:
    """The regex Envoy matches `:authority` with for a policy host: case-insensitive, with
    or without a port. Defined here so the model can check its RE2 program size; the xDS
    renderer must render exactly this (a test compares the two)."""
    name = r"[^.:]+\." + re.escape(host[2:]) if host.startswith("*.") else re.escape(host)
    return f"(?i){name}(:[0-9]+)?"


class Mode(StrEnum):
    ENFORCE = "Enforce"
    # Enforces nothing: Envoy evaluates the rule beside the enforced ones, and a request
    # whose outcome it would change is let through and recorded as `audit`.
    AUDIT = "Audit"


class _RuleBase(StrictModel):
    name: str | None = None
    action: Action = Action.ALLOW
    mode: Mode = Mode.ENFORCE
    ports: tuple[PortSpec, ...] | None = None
    http: HTTPMatch | None = None

    @model_validator(mode="after")
    def _audit_is_a_deny(self) -> _RuleBase:
        if self.mode is Mode.AUDIT and self.action is not Action.DENY:
            raise ValueError(
                "mode Audit is for Deny rules: it records the flows or requests the rule "
                "would deny; fix: make it `action: Deny`, or drop `mode`"
            )
        return self

    @field_validator("name")
    @classmethod
    def _not_a_default_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _check_utf8(value, "rule name")
        if _DEFAULT_RULE_NAME.fullmatch(value):
            raise ValueError(
                f"rule name {value!r} has the form steer gives unnamed rules "
                "(ingress[N], egress[N]), so it could stand for another rule; fix: choose "
                "another name, or omit it"
            )
        return value

    # `peers` is declared by each subclass, under its own alias (`from` or `to`).
    @field_validator("ports", "peers", check_fields=False)
    @classmethod
    def _lists_not_empty(cls, value: tuple[object, ...] | None) -> tuple[object, ...] | None:
        if value is not None and not value:
            raise ValueError(
                "an empty list would match nothing; fix: omit the field to match any, or "
                "list what to match"
            )
        return value


class IngressRule(_RuleBase):
    peers: tuple[Peer, ...] | None = Field(default=None, alias="from")


class EgressRule(_RuleBase):
    peers: tuple[Peer, ...] | None = Field(default=None, alias="to")


Rule = IngressRule | EgressRule


def _unique_rule_names(rules: tuple[IngressRule, ...] | tuple[EgressRule, ...]) -> None:
    """Raise (at `rules[i].name`) where a rule repeats an earlier rule's name in the same
    section: logs, rule comments and Envoy's RBAC policies name rules by it, so two
    rules of one name could not be told apart, and one could hide the other."""
    first: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule.name is None:
            continue
        if rule.name in first:
            error = PydanticCustomError(
                "value_error",
                "rule name {name} is already used by rules[{first}] of this section; fix: "
                "give each rule of a section its own name (or omit it)",
                {"name": repr(rule.name), "first": first[rule.name]},
            )
            raise ValidationError.from_exception_data(
                "rules",
                [InitErrorDetails(type=error, loc=("rules", index, "name"), input=rule.name)],
            )
        first[rule.name] = index


class IngressSection(StrictModel):
    default_action: Action = Field(default=Action.DENY, alias="defaultAction")
    rules: tuple[IngressRule, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> IngressSection:
        _unique_rule_names(self.rules)
        return self


class EgressSection(StrictModel):
    default_action: Action = Field(default=Action.DENY, alias="defaultAction")
    rules: tuple[EgressRule, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> EgressSection:
        _unique_rule_names(self.rules)
        return self


class HTTPPolicySpec(StrictModel):
    pod_selector: LabelSelector = Field(alias="podSelector")
    # Audit: the whole policy enforces nothing, as if it were not there; steer records
    # each flow or request it would deny (a staged policy, tried before it is enforced).
    mode: Mode = Mode.ENFORCE
    ingress: IngressSection | None = None
    egress: EgressSection | None = None

    @model_validator(mode="after")
    def _has_a_section(self) -> HTTPPolicySpec:
        if self.ingress is None and self.egress is None:
            raise ValueError("a policy needs `ingress`, `egress` or both; fix: add one")
        return self


class ObjectMeta(StrictModel):
    """Kubernetes object metadata. steer reads name, namespace and generation; the API
    server's other fields are accepted so that objects read back from a cluster load, and
    anything else is refused, so that a misspelt `namespce` cannot silently move a policy
    to the default namespace."""

    name: str
    namespace: str = "default"
    generation: int = 1
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    creation_timestamp: object = Field(default=None, alias="creationTimestamp")
    deletion_timestamp: object = Field(default=None, alias="deletionTimestamp")
    deletion_grace_period_seconds: int | None = Field(
        default=None, alias="deletionGracePeriodSeconds"
    )
    finalizers: list[str] = Field(default_factory=list)
    owner_references: list[dict[str, object]] = Field(default_factory=list, alias="ownerReferences")
    managed_fields: list[dict[str, object]] = Field(default_factory=list, alias="managedFields")
    generate_name: str | None = Field(default=None, alias="generateName")
    self_link: str | None = Field(default=None, alias="selfLink")

    @field_validator("name")
    @classmethod
    def _dns_subdomain(cls, value: str) -> str:
        if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
            raise ValueError(
                f"name {value!r} is not a DNS subdomain; fix: lowercase letters, digits, '-' "
                "and '.', starting and ending with a letter or digit"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"namespace {value!r} is not a DNS label; fix: e.g. 'default'")
        return value


S = TypeVar("S", IngressSection, EgressSection)


class HTTPPolicy(StrictModel):
    api_version: Literal["steer.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["HTTPPolicy"]
    metadata: ObjectMeta
    spec: HTTPPolicySpec
    # Accepted so that `kubectl get -o yaml` output loads; never read.
    status: dict[str, object] | None = None

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def audits(self) -> bool:
        """Whether the policy, or any of its rules, is of mode Audit."""
        return self.spec.mode is Mode.AUDIT or any(
            rule.mode is Mode.AUDIT for section in self.sections for rule in section.rules
        )

    @property
    def sections(self) -> tuple[IngressSection | EgressSection, ...]:
        return tuple(s for s in (self.spec.ingress, self.spec.egress) if s is not None)

    def enforced(self) -> HTTPPolicy:
        """This policy as if every part of it were of mode Enforce: what it would do."""

        def section(found: S | None) -> S | None:
            if found is None:
                return None
            rules = tuple(r.model_copy(update={"mode": Mode.ENFORCE}) for r in found.rules)
            return found.model_copy(update={"rules": rules})

        spec = self.spec.model_copy(
            update={
                "mode": Mode.ENFORCE,
                "ingress": section(self.spec.ingress),
                "egress": section(self.spec.egress),
            }
        )
        return self.model_copy(update={"spec": spec})
