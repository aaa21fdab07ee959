"""The list-then-watch loop on recorded event streams: 410 relists, reconnects leave no
stale objects, errors back off."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from steer.source.kube import Backoff, Gone, Reflector

Object = dict[str, Any]


def pod(name: str, version: str, **labels: str) -> Object:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "resourceVersion": version,
            "labels": labels,
        },
    }


class Server:
    """A recorded API server: each list returns the next listing, each watch the next
    recorded stream (events, then optionally an exception)."""

    def __init__(self, listings: list[tuple[list[Object], str]], streams: list[list[Any]]):
        self.listings = listings
        self.streams = streams
        self.watched_from: list[str] = []

    def list(self) -> tuple[list[Object], str]:
        return self.listings.pop(0)

    def watch(self, version: str) -> Iterator[Object]:
        self.watched_from.append(version)
        for item in self.streams.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def reflector(server: Server, sleeps: list[float]) -> Reflector:
    return Reflector("pods", server.list, server.watch, sleep=sleeps.append)


def names(r: Reflector) -> list[str]:
    return sorted(o["metadata"]["name"] for o in r.snapshot())


def test_list_then_watch_from_the_list_version() -> None:
    server = Server(
        [([pod("a", "5")], "10")],
        [
            [
                {"type": "ADDED", "object": pod("b", "11")},
                {"type": "DELETED", "object": pod("a", "12")},
            ]
        ],
    )
    r = reflector(server, [])
    r.run_once()
    assert server.watched_from == ["10"]
    assert names(r) == ["b"]
    assert r.resource_version == "12"


def test_gone_event_relists_and_drops_what_vanished_meanwhile() -> None:
    server = Server(
        [([pod("a", "5"), pod("b", "6")], "10"), ([pod("b", "20"), pod("c", "21")], "22")],
        [
            [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}],
            [{"type": "MODIFIED", "object": pod("c", "23", tier="x")}],
        ],
    )
    r = reflector(server, [])
    with pytest.raises(Gone):
        r.run_once()
    r.synced.clear()
    r.run_once()
    assert server.watched_from == ["10", "22"]
    assert names(r) == ["b", "c"]  # "a" was deleted while we were away
    assert r.relists == 2


def test_run_backs_off_on_errors_and_recovers() -> None:
    stop = threading.Event()
    server = Server(
        [([], "1"), ([pod("a", "2")], "3"), ([pod("a", "2")], "3")],
        [[ConnectionResetError("api server restarted")], [TimeoutError("again")], []],
    )
    sleeps: list[float] = []
    r = reflector(server, sleeps)
    changes: list[int] = []
    r.on_change = lambda: changes.append(1) if len(changes) < 10 else stop.set()

    def watch(version: str) -> Iterator[Object]:
        if not server.streams:
            stop.set()
            return
        yield from server.watch(version)

    r.watch_fn = watch
    r.run(stop)
    assert sleeps == [0.2, 0.4]
    assert names(r) == ["a"]


def test_bookmarks_advance_the_version_without_a_change() -> None:
    server = Server(
        [([], "1")], [[{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}]]
    )
    r = reflector(server, [])
    seen: list[int] = []
    r.on_change = lambda: seen.append(1)
    r.run_once()
    assert r.resource_version == "9"
    assert seen == [1]  # the list only


def test_backoff_caps() -> None:
    b = Backoff(initial=1, maximum=4)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 4, 4]
    b.reset()
    assert b.next() == 1


def test_a_change_to_what_the_consumer_does_not_read_signals_nothing() -> None:
    """A leader-election annotation renewed on an Endpoints object every 2 s, a Node's
    status heartbeat: stored, so the cache stays current, but no sync for it."""
    changes: list[str] = []
    renewed = pod("a", "11", app="web")
    renewed["metadata"]["annotations"] = {"leader": "renewed"}
    relabelled = pod("a", "12", app="api")
    server = Server(
        [([pod("a", "5", app="web")], "10")],
        [[{"type": "MODIFIED", "object": renewed}, {"type": "MODIFIED", "object": relabelled}]],
    )
    r = Reflector(
        "pods",
        server.list,
        server.watch,
        on_change=lambda: changes.append(r.resource_version),
        relevant=lambda o: o["metadata"].get("labels"),
    )
    r.run_once()
    assert changes == ["10", "12"]  # the list, then the relabel; not the annotation
    assert r.snapshot()[0]["metadata"]["labels"] == {"app": "api"}
    assert r.resource_version == "12"
