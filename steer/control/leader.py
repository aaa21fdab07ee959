"""Leader election on a coordination.k8s.io/v1 Lease: which control-plane replica writes.

Every replica renders snapshots and serves xDS and the webhooks; only the leader writes
policy status and Events, so two replicas never overwrite each other's. The rules are
client-go's (`k8s.io/client-go/tools/leaderelection`):

- Everyone judges expiry by its own monotonic clock: a Lease held by another is expired
  once its record has not changed for its `leaseDurationSeconds` since this candidate
  first saw it in that form. No one trusts another machine's wall clock (`renewTime`).
- The holder renews every retry period, and leads only until `renew_deadline` after the
  *start* of its last successful renewal; `renew_deadline < lease_duration`, so it has
  stopped writing before anyone else may take over. Seeing another holder ends its lead
  at once.
- Every write is a create (which fails if the Lease exists) or a replace carrying the
  resourceVersion just read, so of two candidates racing for an expired Lease the API
  server lets one win and answers 409 Conflict to the other.

Why not `kubernetes.leaderelection` (37.0.2 does have a LeaseLock): its elector calls
`sys.exit` on a bad setting, takes whole seconds only, cannot be stopped, never tries
again once it lost the lease, and keeps leading after it saw another holder until its
renew deadline. The decision here is a pure function (`plan`); `LeaseElector` is the
thin, threaded adapter around it.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from steer.constants import (
    LEADER_LEASE_DURATION_S,
    LEADER_RENEW_DEADLINE_S,
    LEADER_RETRY_PERIOD_S,
)

log = logging.getLogger("steer.leader")

# client-go's JitterFactor: a follower waits retry_period x [1, 1.2) between attempts so
# that candidates started together do not hit the API server in lockstep.
JITTER: float = 1.2
CONFLICT = 409
NOT_FOUND = 404


@dataclass(frozen=True)
class LeaseTimings:
    """Seconds. `lease_duration` is written into the Lease (an integer there)."""

    lease_duration: int = LEADER_LEASE_DURATION_S
    renew_deadline: float = LEADER_RENEW_DEADLINE_S
    retry_period: float = LEADER_RETRY_PERIOD_S

    def problems(self) -> list[str]:
        """What is wrong with these timings, each with its fix (named as the flags of
        `steer control`); empty if they are usable."""
        found = []
        if self.lease_duration < 1:
            found.append(f"--lease-duration {self.lease_duration}: fix: use 1 or more seconds")
        if self.retry_period <= 0:
            found.append(f"--retry-period {self.retry_period}: fix: use more than 0 seconds")
        if not self.renew_deadline < self.lease_duration:
            found.append(
                f"--renew-deadline {self.renew_deadline} must be less than --lease-duration "
                f"{self.lease_duration}, or a leader could still write after another took "
                "over; fix: lower --renew-deadline or raise --lease-duration"
            )
        if not self.renew_deadline > JITTER * self.retry_period:
            found.append(
                f"--renew-deadline {self.renew_deadline} must exceed {JITTER} x --retry-period "
                f"{self.retry_period}, or a leader gets no second try before it gives up; "
                "fix: raise --renew-deadline or lower --retry-period"
            )
        return found


@dataclass(frozen=True)
class LeaseRecord:
    """The election record a Lease's spec holds. `holder` "" means released."""

    holder: str
    duration_s: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours: move renewTime
    ACQUIRE = "acquire"  # released or expired: take it over
    WAIT = "wait"  # another holds it and it has not expired


@dataclass(frozen=True)
class Plan:
    action: Action
    record: LeaseRecord | None  # what to write; None for WAIT


def _micro_time(value: Any) -> datetime | None:
    """A MicroTime as the API server sends it (`2024-05-01T10:00:00.123456Z`)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def micro_time(moment: datetime) -> str:
    """MicroTime on the wire: always six fractional digits, UTC, `Z` (the API server's
    RFC3339Micro; isoformat() would drop the fraction when it is zero)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_of(lease: Mapping[str, Any]) -> LeaseRecord:
    """The record of a Lease as JSON (an API response); missing fields read as released."""
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    transitions = spec.get("leaseTransitions")
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_s=duration if isinstance(duration, int) else 0,
        acquire_time=_micro_time(spec.get("acquireTime")),
        renew_time=_micro_time(spec.get("renewTime")),
        transitions=transitions if isinstance(transitions, int) else 0,
    )


def lease_body(
    name: str, namespace: str, record: LeaseRecord, resource_version: str | None
) -> dict[str, Any]:
    """The Lease to create (no resourceVersion) or to replace (guarded by one)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_s,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = micro_time(record.acquire_time)
    if record.renew_time is not None:
        spec["renewTime"] = micro_time(record.renew_time)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": spec,
    }


def observe(
    seen: tuple[LeaseRecord | None, float] | None, record: LeaseRecord | None, now: float
) -> tuple[LeaseRecord | None, float]:
    """(record, since when this candidate has seen it unchanged): expiry counts from the
    first sighting of a record, on the local monotonic clock."""
    if seen is not None and seen[0] == record:
        return seen
    return record, now


def plan(
    record: LeaseRecord | None,
    *,
    seen_since: float,
    identity: str,
    now: float,
    wall: datetime,
    timings: LeaseTimings,
) -> Plan:
    """What this candidate does about the Lease it just read. `seen_since` and `now` are
    monotonic seconds (`observe`); `wall` only goes into the record, for people."""
    if record is None:
        return Plan(Action.CREATE, LeaseRecord(identity, timings.lease_duration, wall, wall, 0))
    if record.holder == identity:
        # Ours, also after a restart of this same pod (the old process is gone).
        acquired = record.acquire_time or wall
        renewed = replace(
            record, duration_s=timings.lease_duration, acquire_time=acquired, renew_time=wall
        )
        return Plan(Action.RENEW, renewed)
    # A record without a duration expires after ours: never sooner than the holder expects.
    duration = record.duration_s if record.duration_s > 0 else timings.lease_duration
    if record.holder and now < seen_since + duration:
        return Plan(Action.WAIT, None)
    taken = LeaseRecord(identity, timings.lease_duration, wall, wall, record.transitions + 1)
    return Plan(Action.ACQUIRE, taken)


# --- the adapter ------------------------------------------------------------------------------


class LeaseConflict(Exception):
    """Someone else wrote the Lease since it was read (409): read it again."""


class LeaseApi(Protocol):
    """The three calls the elector makes; JSON in, JSON out."""

    def get(self, name: str, namespace: str) -> dict[str, Any] | None: ...

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def replace(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...


class KubeLeaseApi:
    """LeaseApi on the kubernetes client (coordination.k8s.io/v1, GA since 1.14)."""

    def __init__(self, api_client: Any, timeout: float) -> None:
        from kubernetes import client

        self._api = client.CoordinationV1Api(api_client)
        # A request must not outlive the renew deadline: the lead has ended by then.
        self._timeout = timeout

    def _json(self, call: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = call(*args, _preload_content=False, _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            if exc.status == CONFLICT:
                raise LeaseConflict(str(exc.reason)) from exc
            raise
        loaded: dict[str, Any] = json.loads(response.data)
        return loaded

    def get(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self._json(self._api.read_namespaced_lease, name, namespace)

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        created = self._json(self._api.create_namespaced_lease, namespace, body)
        if created is None:  # 404 on create: the namespace does not exist
            raise LookupError(
                f"namespace {namespace} not found for the Lease; fix: create it, or pass "
                "--lease-namespace"
            )
        return created

    def replace(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        replaced = self._json(self._api.replace_namespaced_lease, name, namespace, body)
        if replaced is None:  # deleted since it was read: the next attempt creates it
            raise LeaseConflict(f"Lease {namespace}/{name} was deleted")
        return replaced


class LeaseElector:
    """Takes part in the election from a thread (`run`); `is_leader()` answers, from any
    thread, whether this replica may write right now."""

    def __init__(
        self,
        api: LeaseApi,
        identity: str,
        name: str,
        namespace: str,
        timings: LeaseTimings | None = None,
        *,
        release_on_stop: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.identity = identity
        self.name = name
        self.namespace = namespace
        self.timings = timings or LeaseTimings()
        if problems := self.timings.problems():
            raise ValueError("; ".join(problems))
        # A clean stop hands the Lease over at once instead of after its duration.
        self.release_on_stop = release_on_stop
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._until = float("-inf")  # monotonic instant the current lead ends
        self._seen: tuple[LeaseRecord | None, float] | None = None
        self._resource_version: str | None = None
        self.transitions = 0  # times this replica started leading

    def is_leader(self) -> bool:
        with self._lock:
            return self._clock() < self._until

    def _lead_until(self, until: float) -> None:
        with self._lock:
            was = self._clock() < self._until
            self._until = until
            now = self._clock() < until
        if now and not was:
            self.transitions += 1
            log.info("%s leads: it now writes policy status and Events", self.identity)
        elif was and not now:
            log.warning("%s stopped leading: it no longer writes status", self.identity)

    def try_once(self) -> bool:
        """One attempt to acquire or renew; True if this replica leads afterwards."""
        started = self._clock()
        try:
            lease = self.api.get(self.name, self.namespace)
        except Exception as exc:  # the API server is away: the lead runs out on its own
            log.warning("Lease %s/%s not read: %s", self.namespace, self.name, exc)
            return self.is_leader()
        record = record_of(lease) if lease is not None else None
        self._resource_version = (lease or {}).get("metadata", {}).get("resourceVersion")
        self._seen = observe(self._seen, record, started)
        decided = plan(
            record,
            seen_since=self._seen[1],
            identity=self.identity,
            now=started,
            wall=self._wall(),
            timings=self.timings,
        )
        if decided.record is None:  # another holds it, unexpired: stop writing now
            self._lead_until(float("-inf"))
            return False
        body = lease_body(self.name, self.namespace, decided.record, self._resource_version)
        try:
            if decided.action is Action.CREATE:
                written = self.api.create(self.namespace, body)
            else:
                written = self.api.replace(self.name, self.namespace, body)
        except LeaseConflict:
            log.info("Lease %s/%s changed meanwhile; reading it again", self.namespace, self.name)
            return self.is_leader()
        except Exception as exc:
            log.warning("Lease %s/%s not written: %s", self.namespace, self.name, exc)
            return self.is_leader()
        self._seen = (record_of(written), started)
        self._resource_version = written.get("metadata", {}).get("resourceVersion")
        self._lead_until(started + self.timings.renew_deadline)
        return True

    def release(self) -> None:
        """Give the Lease up (holder "", as client-go's ReleaseOnCancel) if the record
        names this replica, so another takes over without waiting for it to expire."""
        self._lead_until(float("-inf"))  # stop writing before the others may start
        try:
            lease = self.api.get(self.name, self.namespace)
            if lease is None or record_of(lease).holder != self.identity:
                return
            record = replace(record_of(lease), holder="", duration_s=1, renew_time=self._wall())
            version = lease.get("metadata", {}).get("resourceVersion")
            self.api.replace(
                self.name, self.namespace, lease_body(self.name, self.namespace, record, version)
            )
            log.info("%s released the Lease", self.identity)
        except Exception as exc:  # it expires on its own
            log.warning("Lease %s/%s not released: %s", self.namespace, self.name, exc)

    def run(self, stop: threading.Event) -> None:
        """Acquire and renew until `stop` is set; then release it if so configured. A leader
        retries every retry period, a follower every retry period x [1, 1.2)."""
        while not stop.is_set():
            try:
                leading = self.try_once()
            except Exception:  # a bug here must not end the election for this replica
                log.exception("leader election attempt failed")
                leading = self.is_leader()
            wait = self.timings.retry_period
            if not leading:
                wait *= random.uniform(1.0, JITTER)
            stop.wait(wait)
        if self.release_on_stop:
            self.release()
        else:
            self._lead_until(float("-inf"))
