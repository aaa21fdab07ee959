"""Snapshot versions, the consistency check and per-node push bookkeeping."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from steer.control.cache import (
    InconsistentSnapshot,
    PushRejected,
    Snapshot,
    SnapshotCache,
)
from steer.render.xds import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from tests.xds_builders import static_cluster


def cluster(name: str, port: int = 8080) -> cluster_pb2.Cluster:
    return static_cluster(name, port)


def route(name: str, *clusters: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=f"/{c}"),
                        route=route_components_pb2.RouteAction(cluster=c),
                    )
                    for c in clusters
                ],
            )
        ],
    )


def hcm_filter(route_name: str) -> listener_components_pb2.Filter:
    typed = any_pb2.Any()
    typed.Pack(
        hcm_pb2.HttpConnectionManager(
            stat_prefix="t",
            rds=hcm_pb2.Rds(
                route_config_name=route_name,
                config_source=config_source_pb2.ConfigSource(
                    ads=config_source_pb2.AggregatedConfigSource()
                ),
            ),
        )
    )
    # A name unlike Envoy's well-known one: the check must go by the config's type.
    return listener_components_pb2.Filter(name="hcm", typed_config=typed)


def listener(name: str, route_name: str, *, default_chain: bool = False) -> listener_pb2.Listener:
    chain = listener_components_pb2.FilterChain(filters=[hcm_filter(route_name)])
    if default_chain:
        return listener_pb2.Listener(name=name, default_filter_chain=chain)
    return listener_pb2.Listener(name=name, filter_chains=[chain])


def good() -> Snapshot:
    return Snapshot.of(cluster("a"), cluster("b"), route("r1", "a", "b"), listener("l1", "r1"))


# --- versions -------------------------------------------------------------------------------


def test_version_is_a_content_hash() -> None:
    one, two = good(), good()
    for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE):
        assert one.version(type_url) == two.version(type_url)

    moved = Snapshot.of(cluster("a", 9), cluster("b"), route("r1", "a", "b"), listener("l1", "r1"))
    assert moved.version(CLUSTER_TYPE) != one.version(CLUSTER_TYPE)
    assert moved.version(ROUTE_TYPE) == one.version(ROUTE_TYPE)
    assert moved.resource_version(CLUSTER_TYPE, "a") != one.resource_version(CLUSTER_TYPE, "a")
    assert moved.resource_version(CLUSTER_TYPE, "b") == one.resource_version(CLUSTER_TYPE, "b")


def test_version_ignores_insertion_order_but_not_names() -> None:
    forward = Snapshot({CLUSTER_TYPE: {"a": cluster("a"), "b": cluster("b")}})
    backward = Snapshot({CLUSTER_TYPE: {"b": cluster("b"), "a": cluster("a")}})
    assert forward.version(CLUSTER_TYPE) == backward.version(CLUSTER_TYPE)
    assert Snapshot.of(cluster("c")).version(CLUSTER_TYPE) != Snapshot.of(cluster("d")).version(
        CLUSTER_TYPE
    )


def test_snapshot_does_not_follow_later_edits_of_the_callers_dicts() -> None:
    byname = {"a": cluster("a")}
    snap = Snapshot({CLUSTER_TYPE: byname})
    before = snap.version(CLUSTER_TYPE)
    byname["b"] = cluster("b")
    assert set(snap.get(CLUSTER_TYPE)) == {"a"}
    assert snap.version(CLUSTER_TYPE) == before


# --- consistency ----------------------------------------------------------------------------


def test_consistent_snapshot_passes() -> None:
    good().check_consistency()


def test_missing_route_is_caught() -> None:
    snap = Snapshot.of(cluster("a"), listener("l1", "nope"))
    with pytest.raises(InconsistentSnapshot, match="listener 'l1' uses missing route 'nope'"):
        snap.check_consistency()


def test_missing_route_in_default_filter_chain_is_caught() -> None:
    snap = Snapshot.of(listener("l1", "nope", default_chain=True))
    with pytest.raises(InconsistentSnapshot, match="missing route 'nope'"):
        snap.check_consistency()


def test_missing_cluster_is_caught() -> None:
    snap = Snapshot.of(cluster("a"), route("r1", "a", "gone"), listener("l1", "r1"))
    with pytest.raises(InconsistentSnapshot, match=r"route 'r1' .*missing cluster 'gone'"):
        snap.check_consistency()


def test_missing_weighted_cluster_is_caught() -> None:
    r = route("r1", "a")
    action = r.virtual_hosts[0].routes[0].route
    action.ClearField("cluster")
    action.weighted_clusters.clusters.add(name="a")
    action.weighted_clusters.clusters.add(name="w")
    with pytest.raises(InconsistentSnapshot, match="missing cluster 'w'"):
        Snapshot.of(cluster("a"), r).check_consistency()


def test_key_must_match_resource_name() -> None:
    snap = Snapshot({CLUSTER_TYPE: {"a": cluster("b")}})
    with pytest.raises(InconsistentSnapshot, match="stored as 'a' is named 'b'"):
        snap.check_consistency()


def test_eds_cluster_needs_its_endpoints() -> None:
    eds = cluster_pb2.Cluster(name="e", type=cluster_pb2.Cluster.EDS)
    with pytest.raises(InconsistentSnapshot, match="EDS cluster 'e' has no endpoints 'e'"):
        Snapshot.of(eds).check_consistency()
    Snapshot.of(eds, endpoint_pb2.ClusterLoadAssignment(cluster_name="e")).check_consistency()


# --- the cache ------------------------------------------------------------------------------


def test_set_snapshot_reports_whether_anything_changed() -> None:
    cache = SnapshotCache()
    assert cache.get("n1") is None
    assert cache.set_snapshot("n1", good())
    first = cache.get("n1")
    assert cache.generation("n1") == 1

    assert not cache.set_snapshot("n1", good())
    assert cache.get("n1") is first
    assert cache.generation("n1") == 1

    assert cache.set_snapshot("n1", Snapshot.of(cluster("a")))
    assert cache.generation("n1") == 2
    assert cache.nodes() == ["n1"]


def test_inconsistent_snapshot_is_refused_and_the_old_one_kept() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n1", good())
    kept = cache.get("n1")
    with pytest.raises(InconsistentSnapshot):
        cache.set_snapshot("n1", Snapshot.of(listener("l1", "nope")))
    assert cache.get("n1") is kept


def test_ack_and_nack_bookkeeping() -> None:
    cache = SnapshotCache()
    cache.stream_opened("n1")
    cache.record_push("n1", LISTENER_TYPE, "v1")
    cache.record_ack("n1", LISTENER_TYPE, "v1")
    cache.record_push("n1", LISTENER_TYPE, "v2")
    cache.record_nack("n1", LISTENER_TYPE, "v2", "bad listener")

    status = cache.status("n1")
    assert status.acked == {LISTENER_TYPE: "v1"}
    assert status.sent == {LISTENER_TYPE: "v2"}
    assert status.last_nack is not None
    assert (status.last_nack.type_url, status.last_nack.version) == (LISTENER_TYPE, "v2")
    assert status.last_nack.detail == "bad listener"
    assert (status.pushes, status.acks, status.nacks, status.streams) == (2, 1, 1, 1)

    cache.stream_closed("n1")
    assert cache.status("n1").streams == 0


async def test_wait_for_change_wakes_on_a_new_snapshot() -> None:
    cache = SnapshotCache()
    waiter = asyncio.create_task(cache.wait_for_change("n1", cache.generation("n1")))
    await asyncio.sleep(0)
    assert not waiter.done()
    cache.set_snapshot("n1", good())
    assert await asyncio.wait_for(waiter, 1) == 1


async def test_wait_for_ack_returns_once_every_type_is_acked() -> None:
    cache = SnapshotCache()
    snap = good()
    cache.set_snapshot("n1", snap)
    waiter = asyncio.create_task(cache.wait_for_ack("n1"))
    for type_url in (CLUSTER_TYPE, LISTENER_TYPE):
        cache.record_ack("n1", type_url, snap.version(type_url))
    await asyncio.sleep(0)
    assert not waiter.done(), "routes are not acked yet"
    cache.record_ack("n1", ROUTE_TYPE, snap.version(ROUTE_TYPE))
    status = await asyncio.wait_for(waiter, 1)
    assert status.acked[ROUTE_TYPE] == snap.version(ROUTE_TYPE)


async def test_wait_for_ack_raises_when_the_version_is_rejected() -> None:
    cache = SnapshotCache()
    snap = good()
    cache.set_snapshot("n1", snap)
    waiter = asyncio.create_task(cache.wait_for_ack("n1", [ROUTE_TYPE]))
    await asyncio.sleep(0)
    cache.record_nack("n1", ROUTE_TYPE, snap.version(ROUTE_TYPE), "regex")
    with pytest.raises(PushRejected, match="regex"):
        await asyncio.wait_for(waiter, 1)
