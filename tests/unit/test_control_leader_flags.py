"""`steer control --kube --leader-elect` and its Lease flags: defaults from the downward
API's environment, and errors that name the flag and the fix."""

from __future__ import annotations

import pytest

from steer.cli import _leader_elector, build_parser
from steer.constants import LEADER_LEASE_NAME, SYSTEM_NAMESPACE
from steer.control.leader import LeaseElector, LeaseTimings


def elector(monkeypatch: pytest.MonkeyPatch, *flags: str, **env: str) -> object:
    for name in ("POD_NAME", "POD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["control", "--kube", *flags])
    return _leader_elector(args, None)


def test_without_leader_elect_there_is_no_election(monkeypatch: pytest.MonkeyPatch) -> None:
    # The only replica writes, as before: tests/k8s and single-replica installs.
    assert elector(monkeypatch) is None


def test_lease_flags_without_leader_elect_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    error = elector(monkeypatch, "--lease-name", "x", "--retry-period", "1")
    assert error == (
        "--lease-name, --retry-period only mean something with --leader-elect; fix: add it"
    )


def test_identity_and_namespace_come_from_the_downward_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got = elector(
        monkeypatch, "--leader-elect", POD_NAME="steer-control-7f-abcde", POD_NAMESPACE="ops"
    )
    assert isinstance(got, LeaseElector)
    assert (got.identity, got.name, got.namespace) == (
        "steer-control-7f-abcde",
        LEADER_LEASE_NAME,
        "ops",
    )
    assert got.timings == LeaseTimings()
    assert got.release_on_stop


def test_flags_override_and_outside_a_pod_the_identity_is_unique(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = ("--leader-elect", "--lease-name", "l", "--lease-duration", "4")
    first = elector(monkeypatch, *flags, "--renew-deadline", "3", "--retry-period", "0.5")
    second = elector(monkeypatch, *flags, "--renew-deadline", "3")
    assert isinstance(first, LeaseElector) and isinstance(second, LeaseElector)
    assert (first.name, first.namespace) == ("l", SYSTEM_NAMESPACE)
    assert first.timings == LeaseTimings(4, 3.0, 0.5)
    assert first.identity != second.identity  # hostname plus a random suffix
    named = elector(monkeypatch, "--leader-elect", "--identity", "me", POD_NAME="pod")
    assert isinstance(named, LeaseElector) and named.identity == "me"


def test_inconsistent_timings_are_refused_naming_the_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The default renew deadline (10 s) is not below a 5 s lease.
    error = elector(monkeypatch, "--leader-elect", "--lease-duration", "5")
    assert isinstance(error, str)
    assert "--renew-deadline 10.0 must be less than --lease-duration 5" in error
    assert "fix: lower --renew-deadline or raise --lease-duration" in error
