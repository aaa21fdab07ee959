"""A change's revocation reads the flows of the addresses it touched, and no others."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

from steer.model.enforce import Resolver, Touched, touched
from tests.samples import API, CLIENT, PODS, WEB, sample_policies


def ip(pod: object) -> IPv4Address:
    return IPv4Address(pod.ip)  # type: ignore[attr-defined]


def test_no_previous_resolution_means_everything() -> None:
    assert touched(None, Resolver().resolve(sample_policies(), PODS)) is None


def test_nothing_changed_touches_nothing() -> None:
    resolver = Resolver()
    before = resolver.resolve(sample_policies(), PODS)
    after = resolver.resolve(sample_policies(), PODS)
    scope = touched(before, after)
    assert scope == Touched(frozenset(), frozenset())
    assert not scope


def test_a_policy_change_touches_only_the_sides_it_changes() -> None:
    resolver = Resolver()
    policies = sample_policies()
    before = resolver.resolve(policies, PODS)
    without_api = [p for p in policies if p.metadata.name != "api"]
    scope = touched(before, resolver.resolve(without_api, PODS))
    assert scope == Touched(frozenset(), frozenset({ip(API)}))


def test_a_pod_that_changed_is_touched_both_ways() -> None:
    resolver = Resolver()
    before = resolver.resolve(sample_policies(), PODS)
    relabelled = [CLIENT, replace(WEB, annotations={"steer.dev/dataplane": "iptables"}), API]
    scope = touched(before, resolver.resolve(sample_policies(), relabelled))
    assert scope is not None
    assert ip(WEB) in scope.sources and ip(WEB) in scope.destinations
    assert ip(API) not in scope.sources | scope.destinations
