"""In a cluster, a policy Envoy refused is held back with Programmed=False (reason
RefusedByEnvoy, Envoy's message) and an Event, and the other policies keep flowing."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from steer.control.kubeplane import KubeControlPlane
from steer.render.xds import ROUTE_TYPE
from tests.unit.test_unprotected_pods import _Recorder, api_policy, recording_plane

NODE = "worker-2"
REASON = "Proto constraint validation failed (RouteConfigurationValidationError)"


def named(name: str, path: str) -> dict[str, Any]:
    obj = copy.deepcopy(api_policy({"matchLabels": {"app": "web"}}))
    obj["metadata"]["name"] = name
    obj["spec"] = {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": {"rules": [{"http": {"paths": [{"prefix": path}]}}]},
    }
    return obj


def accept_everything(plane: KubeControlPlane) -> None:
    snapshot = plane.cache.get(NODE)
    assert snapshot is not None
    for type_url, resources in snapshot.resources.items():
        if resources:
            plane.cache.record_ack(NODE, type_url, snapshot.version(type_url))


def test_a_refused_policy_is_held_back_with_programmed_false_and_an_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policies = {"shop/a": named("a", "/a"), "shop/b": named("b", "/b")}
    plane = recording_plane(monkeypatch, policies)
    plane.cache.stream_opened(NODE)
    plane.refresh()
    accept_everything(plane)
    assert not plane.check_pushes()

    edited = named("b", "/b2")
    edited["metadata"]["resourceVersion"] = "813"
    policies["shop/b"] = edited
    plane.refresh()
    snapshot = plane.cache.get(NODE)
    assert snapshot is not None
    plane.cache.record_nack(NODE, ROUTE_TYPE, snapshot.version(ROUTE_TYPE), REASON)
    assert plane.check_pushes()
    assert not plane.check_pushes(), "one NACK is acted on once"
    plane.refresh()
    assert [p.key for p in plane._pushed] == ["shop/a"]

    plane.write_statuses()
    statuses = dict(_Recorder.statuses)
    [programmed] = [c for c in statuses["b"]["status"]["conditions"] if c["type"] == "Programmed"]
    assert (programmed["status"], programmed["reason"]) == ("False", "RefusedByEnvoy")
    assert REASON in programmed["message"]
    refusals = [e for _, e in _Recorder.events if e["reason"] == "RefusedByEnvoy"]
    assert [e["involvedObject"]["name"] for e in refusals] == ["b"]

    # Fixed: tried again.
    fixed = named("b", "/b3")
    fixed["metadata"]["resourceVersion"] = "814"
    policies["shop/b"] = fixed
    plane.refresh()
    assert [p.key for p in plane._pushed] == ["shop/a", "shop/b"]


async def test_a_failing_control_loop_step_is_counted_and_survived(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from steer.control import kubeplane

    plane = KubeControlPlane(api_client=None)
    steps = 0

    async def step(_dirty: object) -> None:
        nonlocal steps
        steps += 1
        if steps == 1:
            raise RuntimeError("a bug one object hits")
        raise asyncio.CancelledError

    monkeypatch.setattr(plane, "_step", step)
    monkeypatch.setattr(kubeplane, "LOOP_RETRY_S", 0.0)
    with pytest.raises(asyncio.CancelledError):
        await plane._loop(asyncio.Event())
    assert (steps, plane.loop_errors) == (2, 1)
