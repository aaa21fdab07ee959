"""Two control-plane replicas against a real kube-apiserver: one Lease, one writer.

Both replicas render and serve xDS; only the holder of the Lease writes policy status. The
leader is then stopped the way a crash stops it (its elector never releases the Lease), and
the other replica takes the Lease once it has expired and writes status again: a change to
the policy shows up as the status's observedGeneration. A clean stop instead releases the
Lease and hands over at once. Short timings keep the whole module to a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from steer.constants import API_GROUP, API_VERSION, LEADER_LEASE_NAME, POLICY_PLURAL
from steer.control.kubeplane import KubeControlPlane
from steer.control.leader import KubeLeaseApi, LeaseElector, LeaseTimings
from steer.render.xds import LISTENER_TYPE
from tests.k8s import kubeapi

# Expiry after 2 s; a leader that cannot renew stops writing after 1.5 s.
FAST = LeaseTimings(lease_duration=2, renew_deadline=1.5, retry_period=0.25)


def eventually(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    return kubeapi.eventually(check, what, timeout, interval=0.05)


@dataclass
class Replica:
    """One control-plane replica, in a thread with its own event loop and API client."""

    name: str
    plane: KubeControlPlane
    elector: LeaseElector
    socket: Path
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        def cancel() -> None:
            if self.task is not None:
                self.task.cancel()

        self.loop.call_soon_threadsafe(cancel)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), f"replica {self.name} did not stop"


@pytest.fixture
def namespace(kube_api: client.ApiClient, crd: None) -> Iterator[str]:
    """A namespace of the test's own, holding both the policy and the Lease."""
    core = client.CoreV1Api(kube_api)
    name = f"steer-ha-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)


@pytest.fixture
def replicas(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[Callable[[str, LeaseTimings, bool], Replica]]:
    started: list[Replica] = []
    clients: list[Any] = []

    def start(name: str, timings: LeaseTimings, release_on_stop: bool) -> Replica:
        api = config.new_client_from_config(config_file=str(kubeconfig), persist_config=False)
        clients.append(api)
        elector = LeaseElector(
            KubeLeaseApi(api, timings.renew_deadline),
            name,
            LEADER_LEASE_NAME,
            namespace,
            timings,
            release_on_stop=release_on_stop,
        )
        plane = KubeControlPlane(api, leader=elector)
        loop = asyncio.new_event_loop()
        socket = tmp_path / f"xds-{name}.sock"
        replica = Replica(name, plane, elector, socket, loop, threading.Thread(target=lambda: 0))

        def run() -> None:
            asyncio.set_event_loop(loop)
            replica.task = loop.create_task(plane.run(None, socket))
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(replica.task)
            # Not closed here: gRPC's asyncio poller is one per process and hands each loop
            # its events; a late event for a replica whose loop is closed raised in the
            # other's handler and cost it the rest of the batch, and that replica's server
            # then never finished stopping. Closed at teardown, once every replica stopped.

        replica.thread = threading.Thread(target=run, name=f"replica-{name}", daemon=True)
        replica.thread.start()
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        try:
            for replica in started:
                if replica.thread.is_alive():
                    replica.stop()
        finally:
            for replica in started:
                if not replica.loop.is_running():
                    replica.loop.close()
            for api in clients:
                api.close()


def web_policy(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "HTTPPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": {"defaultAction": "Deny", "rules": [{"http": {"methods": ["GET"]}}]},
        },
    }


def lease_holder(kube_api: client.ApiClient, namespace: str) -> str | None:
    try:
        lease = client.CoordinationV1Api(kube_api).read_namespaced_lease(
            LEADER_LEASE_NAME, namespace
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return str(lease.spec.holder_identity or "")


def observed_generation(custom: client.CustomObjectsApi, namespace: str) -> int | None:
    got = custom.get_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, "web"
    )
    status = got.get("status") or {}
    accepted = [c for c in status.get("conditions", []) if c["type"] == "Accepted"]
    if not accepted or accepted[0]["observedGeneration"] != got["metadata"]["generation"]:
        return None
    return int(status["observedGeneration"])


def listeners_from(socket: Path) -> int:
    """Ask a replica's ADS server for a node's listeners, as an Envoy would."""

    async def fetch() -> int:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=base_pb2.Node(id="node-ha"), type_url=LISTENER_TYPE
                )
            )
            response = await asyncio.wait_for(call.read(), timeout=10)
            call.cancel()
            return len(response.resources)

    return asyncio.run(fetch())


def test_only_the_leader_writes_and_the_other_takes_over_after_a_crash(
    kube_api: client.ApiClient, namespace: str, replicas: Callable[..., Replica]
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, POLICY_PLURAL, web_policy(namespace)
    )
    # A crash never releases the Lease: model it by stopping an elector that does not.
    both = {r.name: r for r in (replicas("a", FAST, False), replicas("b", FAST, False))}

    holder = eventually(lambda: lease_holder(kube_api, namespace), "a leader")
    leader = both[holder]
    [follower] = [r for r in both.values() if r is not leader]
    assert eventually(lambda: observed_generation(custom, namespace), "status") == 1

    # Both render and serve xDS; only the leader wrote the status.
    eventually(lambda: follower.plane.policy_objects, "the follower to load the policy")
    for replica in both.values():
        assert listeners_from(replica.socket) > 0, f"{replica.name} serves no xDS"
    assert leader.plane.status_writes >= 1
    assert follower.plane.status_writes == 0
    assert follower.elector.is_leader() is False

    # The leader crashes; a spec change now waits for a writer.
    leader.stop()
    crashed_at = time.monotonic()
    patched = custom.patch_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        namespace,
        POLICY_PLURAL,
        "web",
        {"spec": {"ingress": {"defaultAction": "Allow"}}},
    )
    assert patched["metadata"]["generation"] == 2
    time.sleep(0.5)
    assert lease_holder(kube_api, namespace) == leader.name, "taken before it expired"
    assert observed_generation(custom, namespace) is None, "written without a leader"

    # The follower takes the Lease once it has seen it unchanged for its duration, then
    # writes the status of generation 2.
    assert eventually(lambda: observed_generation(custom, namespace) == 2, "status after failover")
    took = time.monotonic() - crashed_at
    assert lease_holder(kube_api, namespace) == follower.name
    assert follower.elector.is_leader() and follower.plane.status_writes >= 1
    # Not before the Lease could have expired (its last renewal may predate the crash by a
    # retry period); the upper bound only guards against a hang, with room for a slow host.
    assert FAST.lease_duration - FAST.retry_period * 1.2 <= took < 10, took
    lease = client.CoordinationV1Api(kube_api).read_namespaced_lease(LEADER_LEASE_NAME, namespace)
    assert lease.spec.lease_transitions == 1


def test_a_clean_stop_releases_the_lease_and_hands_over_at_once(
    kube_api: client.ApiClient, namespace: str, replicas: Callable[..., Replica]
) -> None:
    # A long lease: only a release explains a handover well before it expires.
    slow = LeaseTimings(lease_duration=30, renew_deadline=10, retry_period=0.25)
    first = replicas("first", slow, True)
    eventually(lambda: lease_holder(kube_api, namespace) == "first", "the first to lead")
    second = replicas("second", slow, True)
    eventually(second.plane.reflectors["httppolicies"].synced.is_set, "second synced")
    assert lease_holder(kube_api, namespace) == "first"

    first.stop()  # as on SIGTERM: steer control cancels the plane, which releases the Lease
    stopped_at = time.monotonic()
    eventually(lambda: lease_holder(kube_api, namespace) == "second", "the handover", timeout=5)
    assert time.monotonic() - stopped_at < 5
    assert second.elector.is_leader()


def test_steer_control_releases_the_lease_on_sigterm(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    """The process as the Deployment runs it (--leader-elect, identity from POD_NAME): the
    kubelet's SIGTERM ends it cleanly, releasing the Lease; SIGKILL (a crash) leaves it."""

    def start(pod: str) -> subprocess.Popen[bytes]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            *(sys.executable, "-m", "steer.cli", "control", "--kube", "--leader-elect"),
            *("--kubeconfig", str(kubeconfig), "--xds-port", str(port)),
            *("--lease-duration", "30", "--renew-deadline", "10", "--retry-period", "0.25"),
        ]
        # The child keeps its own copy of the descriptor; the parent's closes at once.
        with (tmp_path / f"{pod}.log").open("wb") as log:
            return subprocess.Popen(
                command,
                env={**os.environ, "POD_NAME": pod, "POD_NAMESPACE": namespace},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    killed = start("steer-control-killed")
    try:
        eventually(lambda: lease_holder(kube_api, namespace) == "steer-control-killed", "lead")
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        time.sleep(1)
        assert lease_holder(kube_api, namespace) == "steer-control-killed"
    finally:
        if killed.poll() is None:
            killed.kill()
    # A new leader needs the old Lease out of the way; this test is about release only.
    client.CoordinationV1Api(kube_api).delete_namespaced_lease(LEADER_LEASE_NAME, namespace)

    stopped = start("steer-control-stopped")
    try:
        eventually(lambda: lease_holder(kube_api, namespace) == "steer-control-stopped", "lead")
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=15) == 0, (tmp_path / "steer-control-stopped.log").read_text()
        assert lease_holder(kube_api, namespace) == ""
    finally:
        if stopped.poll() is None:
            stopped.kill()
