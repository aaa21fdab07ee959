"""Leader election on a Lease (steer.control.leader): the pure decision, the wire format,
and the elector against an in-memory API server that enforces resourceVersion, on a fake
clock. The real API server is in tests/k8s/test_leader_failover.py."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from steer.control.kubeplane import KubeControlPlane
from steer.control.leader import (
    Action,
    LeaseConflict,
    LeaseElector,
    LeaseRecord,
    LeaseTimings,
    lease_body,
    micro_time,
    observe,
    plan,
    record_of,
)
from tests.unit.test_unprotected_pods import _Recorder, recording_plane

WALL = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
T = LeaseTimings(lease_duration=15, renew_deadline=10, retry_period=2)


def held(holder: str, transitions: int = 0, duration: int = 15) -> LeaseRecord:
    return LeaseRecord(holder, duration, WALL, WALL, transitions)


def decide(record: LeaseRecord | None, seen_since: float, now: float, me: str = "b") -> Any:
    return plan(record, seen_since=seen_since, identity=me, now=now, wall=WALL, timings=T)


# --- the decision ---------------------------------------------------------------------------


def test_no_lease_is_created_with_this_candidate_as_holder() -> None:
    decided = decide(None, 0, 0)
    assert decided.action is Action.CREATE
    assert decided.record == LeaseRecord("b", 15, WALL, WALL, 0)


def test_another_holders_lease_is_waited_for_until_it_has_been_still_for_its_duration() -> None:
    assert decide(held("a"), seen_since=100, now=114.9).action is Action.WAIT
    taken = decide(held("a", transitions=3), seen_since=100, now=115)
    assert taken.action is Action.ACQUIRE
    assert taken.record == LeaseRecord("b", 15, WALL, WALL, 4)


def test_expiry_uses_the_duration_the_holder_wrote() -> None:
    assert decide(held("a", duration=60), seen_since=0, now=59).action is Action.WAIT
    # No duration at all: never sooner than our own.
    assert decide(held("a", duration=0), seen_since=0, now=14).action is Action.WAIT
    assert decide(held("a", duration=0), seen_since=0, now=15).action is Action.ACQUIRE


def test_a_released_lease_is_taken_at_once() -> None:
    assert decide(held(""), seen_since=100, now=100).action is Action.ACQUIRE


def test_our_own_lease_is_renewed_keeping_its_acquire_time_and_transitions() -> None:
    earlier = datetime(2024, 5, 1, 9, 0, 0, tzinfo=UTC)
    record = LeaseRecord("b", 30, earlier, earlier, 2)
    decided = decide(record, seen_since=0, now=1000)
    assert decided.action is Action.RENEW
    assert decided.record == LeaseRecord("b", 15, earlier, WALL, 2)


def test_expiry_counts_from_the_first_sighting_of_a_record_not_from_its_renew_time() -> None:
    """Clocks of other machines are never trusted: only a record that stays the same for
    the duration, on this candidate's clock, has expired."""
    first = observe(None, held("a"), now=5)
    assert observe(first, held("a"), now=9) == (held("a"), 5)
    renewed = LeaseRecord("a", 15, WALL, datetime(2024, 5, 1, 10, 0, 2, tzinfo=UTC), 0)
    assert observe(first, renewed, now=9) == (renewed, 9)


@pytest.mark.parametrize(
    ("timings", "flag"),
    [
        (LeaseTimings(10, 10, 2), "--renew-deadline 10 must be less than --lease-duration"),
        (LeaseTimings(15, 2, 2), "must exceed 1.2 x --retry-period"),
        (LeaseTimings(0, 0.5, 0.1), "--lease-duration 0: fix"),
        (LeaseTimings(15, 10, 0), "--retry-period 0: fix"),
    ],
)
def test_bad_timings_name_the_flag_and_the_fix(timings: LeaseTimings, flag: str) -> None:
    problems = timings.problems()
    assert any(flag in p and "fix" in p for p in problems), problems
    with pytest.raises(ValueError, match="fix"):
        LeaseElector(MemoryLeases(), "a", "l", "ns", timings)


def test_the_defaults_are_client_gos() -> None:
    assert LeaseTimings() == LeaseTimings(15, 10.0, 2.0)
    assert LeaseTimings().problems() == []


# --- the wire format ----------------------------------------------------------------------


def test_record_of_reads_a_lease_as_the_api_server_sends_it() -> None:
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "steer-control", "namespace": "steer-system", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": "steer-control-5d9c-abcde",
            "leaseDurationSeconds": 15,
            "acquireTime": "2024-05-01T10:00:00.000000Z",
            "renewTime": "2024-05-01T10:00:04.250000Z",
            "leaseTransitions": 2,
        },
    }
    assert record_of(lease) == LeaseRecord(
        "steer-control-5d9c-abcde",
        15,
        WALL,
        datetime(2024, 5, 1, 10, 0, 4, 250000, tzinfo=UTC),
        2,
    )
    assert record_of({"spec": {}}) == LeaseRecord("", 0, None, None, 0)
    assert record_of({"spec": {"renewTime": "yesterday"}}).renew_time is None


def test_micro_time_always_has_six_digits_and_round_trips() -> None:
    # The API server parses RFC3339Micro; isoformat() drops a zero fraction.
    assert micro_time(WALL) == "2024-05-01T10:00:00.000000Z"
    record = LeaseRecord("a", 15, WALL, datetime(2024, 5, 1, 10, 0, 1, 5, tzinfo=UTC), 1)
    body = lease_body("steer-control", "steer-system", record, "42")
    assert body["metadata"]["resourceVersion"] == "42"
    assert record_of(body) == record
    assert "resourceVersion" not in lease_body("l", "ns", record, None)["metadata"]


# --- the elector, on an in-memory API server and a fake clock -----------------------------


class MemoryLeases:
    """Create fails if it exists, replace fails unless the resourceVersion is current:
    the two guarantees of the API server the election rests on."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("API server unreachable")

    def get(self, name: str, namespace: str) -> dict[str, Any] | None:
        self._check()
        return copy.deepcopy(self.lease)

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if self.lease is not None:
            raise LeaseConflict("AlreadyExists")
        return self._store(body)

    def replace(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise LeaseConflict("the object has been modified")
        return self._store(body)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    @property
    def holder(self) -> str:
        assert self.lease is not None
        return str(self.lease["spec"]["holderIdentity"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def electors(*names: str) -> tuple[MemoryLeases, Clock, list[LeaseElector]]:
    api, clock = MemoryLeases(), Clock()
    made = [
        LeaseElector(api, name, "steer-control", "steer-system", T, clock=clock) for name in names
    ]
    return api, clock, made


def test_one_leads_the_other_waits_and_takes_over_once_the_leader_stops_renewing() -> None:
    api, clock, (a, b) = electors("a", "b")
    assert a.try_once() and a.is_leader()
    assert not b.try_once() and not b.is_leader()
    # a keeps renewing: b never takes over.
    for _ in range(20):
        clock.now += T.retry_period
        assert a.try_once()
        assert not b.try_once()
    # a crashes (no release). b waits out the duration from when it first saw a's last
    # renewal (just now), whatever renewTime says.
    seen = clock.now
    clock.now += T.retry_period
    assert not b.try_once()
    clock.now = seen + T.lease_duration - 0.1
    assert not b.try_once()
    assert not a.is_leader(), "a's own lead ended first (renew deadline < lease duration)"
    clock.now = seen + T.lease_duration
    assert b.try_once() and b.is_leader()
    assert api.holder == "b"
    assert api.lease is not None and api.lease["spec"]["leaseTransitions"] == 1


def test_a_leader_that_cannot_renew_stops_writing_at_its_renew_deadline() -> None:
    api, clock, (a,) = electors("a")
    assert a.try_once()
    renewed_at = clock.now
    api.down = True
    clock.now = renewed_at + T.renew_deadline - 0.01
    assert a.try_once() and a.is_leader()  # still within its deadline
    clock.now = renewed_at + T.renew_deadline
    assert not a.try_once() and not a.is_leader()
    # Strictly before anyone else could take over:
    assert T.renew_deadline < T.lease_duration


def test_a_leader_that_sees_another_holder_stops_at_once() -> None:
    api, clock, (a,) = electors("a")
    assert a.try_once()
    assert api.lease is not None
    api.lease["spec"]["holderIdentity"] = "intruder"  # e.g. a's renewals were lost for long
    clock.now += T.retry_period
    assert not a.try_once()
    assert not a.is_leader()


def test_of_two_candidates_racing_for_an_expired_lease_only_one_wins() -> None:
    api, clock, (a, b, c) = electors("a", "b", "c")
    assert a.try_once()
    assert not b.try_once() and not c.try_once()
    clock.now += T.lease_duration
    # b and c both read the same expired record; b writes first, c's write is refused.
    real_get = api.get
    stale = real_get("steer-control", "steer-system")
    assert b.try_once()
    api.get = lambda *_: copy.deepcopy(stale)  # type: ignore[method-assign]
    assert not c.try_once()
    api.get = real_get  # type: ignore[method-assign]
    assert api.holder == "b"
    assert b.is_leader() and not c.is_leader()


def test_release_hands_over_without_waiting_for_expiry() -> None:
    api, _, (a, b) = electors("a", "b")
    assert a.try_once()
    assert not b.try_once()
    a.release()
    assert not a.is_leader()
    assert api.holder == ""
    assert b.try_once() and api.holder == "b"
    # A replica that does not hold it leaves the Lease alone.
    a.release()
    assert api.holder == "b"


def test_run_releases_on_stop_only_if_asked() -> None:
    for release, holder in ((True, ""), (False, "a")):
        api = MemoryLeases()
        elector = LeaseElector(api, "a", "l", "ns", T, release_on_stop=release)
        stop = threading.Event()
        stop.set()  # one pass: nothing runs, so lead first by hand
        assert elector.try_once()
        elector.run(stop)
        assert api.holder == holder
        assert not elector.is_leader()


# --- the control plane: only the leader writes ----------------------------------------------


class Lead:
    def __init__(self, leading: bool) -> None:
        self.leading = leading

    def is_leader(self) -> bool:
        return self.leading


def test_only_the_leader_writes_status_and_events_and_a_follower_still_renders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lead = Lead(False)
    plane = recording_plane(monkeypatch, leader=lead)
    plane.cache.stream_opened("worker-2")
    plane.refresh()
    assert plane.cache.get("worker-2") is not None, "a follower still serves its Envoys"
    plane.write_statuses()
    assert (_Recorder.statuses, _Recorder.events, plane.status_writes) == ([], [], 0)

    lead.leading = True
    plane.write_statuses()
    assert [name for name, _ in _Recorder.statuses] == ["web-egress"]
    assert len(_Recorder.events) == 1  # PodsUnprotected: a host-network pod is selected
    assert (plane.status_writes, plane.events_written) == (1, 1)


def test_a_replica_that_loses_the_lease_mid_way_stops_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter([True, True, False])  # the third question comes before the first patch
    lead = Lead(True)
    lead.is_leader = lambda: next(answers, False)  # type: ignore[method-assign]
    plane = recording_plane(monkeypatch, leader=lead)
    plane.refresh()
    plane.write_statuses()
    # It was leader when it started and when it raised the Event, not when it would patch.
    assert len(_Recorder.events) == 1
    assert _Recorder.statuses == []
    assert plane.status_writes == 0


def test_without_an_elector_the_only_replica_always_writes() -> None:
    assert KubeControlPlane(api_client=None).writes()
