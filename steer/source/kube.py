"""Kubernetes as a source: list, then watch from the list's resourceVersion.

A `Reflector` keeps a cache of one resource kind in step with the API server the way
client-go's does: after a list it replaces its cache wholesale (so nothing deleted while it
was away survives a reconnect), it watches from the list's resourceVersion, relists at
once on `410 Gone`, and backs off exponentially on other errors. The list and watch calls
are injected, so the same code runs against a real API server and against recorded event
streams in tests.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from steer.constants import API_GROUP, API_VERSION, POLICY_PLURAL
from steer.model.load import PolicyError
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.source.kubeobjects import pods_from_objects, policy_from_object

log = logging.getLogger("steer.kube")

Object = dict[str, Any]
ListFn = Callable[[], tuple[list[Object], str]]
WatchFn = Callable[[str], Iterator[Object]]
GONE = 410


class Gone(Exception):
    """The resourceVersion watched from is too old: relist."""


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


@dataclass
class Backoff:
    initial: float = 0.2
    maximum: float = 30.0
    current: float = 0.0

    def next(self) -> float:
        self.current = self.initial if self.current == 0 else min(self.current * 2, self.maximum)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


@dataclass
class Reflector:
    kind: str
    list_fn: ListFn
    watch_fn: WatchFn
    on_change: Callable[[], None] = lambda: None
    # What of an object its consumer reads: a MODIFIED event that leaves it equal is
    # stored but signals no change (a Node's status heartbeat, a leader-election
    # annotation renewed on an Endpoints object every 2 s). None: all of it.
    relevant: Callable[[Object], object] | None = None
    backoff: Backoff = field(default_factory=Backoff)
    sleep: Callable[[float], None] = time.sleep
    items: dict[str, Object] = field(default_factory=dict)
    resource_version: str = ""
    synced: threading.Event = field(default_factory=threading.Event)
    relists: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Object]:
        with self._lock:
            return list(self.items.values())

    def relist(self) -> None:
        objects, version = self.list_fn()
        with self._lock:
            self.items = {object_key(o): o for o in objects}
            self.resource_version = version
        self.relists += 1
        self.synced.set()
        self.on_change()

    def apply(self, event: Object) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == GONE:
                raise Gone(obj.get("message", "resourceVersion too old"))
            raise RuntimeError(f"watch error: {obj.get('message', obj)}")
        version = obj.get("metadata", {}).get("resourceVersion")
        unchanged = False
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                before = self.items.get(object_key(obj))
                unchanged = (
                    kind == "MODIFIED"
                    and self.relevant is not None
                    and before is not None
                    and self.relevant(before) == self.relevant(obj)
                )
                self.items[object_key(obj)] = obj
            elif kind == "DELETED":
                self.items.pop(object_key(obj), None)
            if version:
                self.resource_version = version
        if kind != "BOOKMARK" and not unchanged:
            self.on_change()

    def run_once(self) -> None:
        """One list and one watch, until the watch ends (server timeout) or fails."""
        if not self.synced.is_set() or not self.resource_version:
            self.relist()
        for event in self.watch_fn(self.resource_version):
            self.apply(event)
        self.backoff.reset()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Gone as exc:
                log.info("%s: %s; relisting", self.kind, exc)
                self.synced.clear()
            except Exception as exc:  # the API server is away: back off, then relist
                delay = self.backoff.next()
                log.warning("%s watch failed (%s); retrying in %.1fs", self.kind, exc, delay)
                self.synced.clear()
                self.sleep(delay)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=f"reflect-{self.kind}")
        thread.daemon = True
        thread.start()
        return thread


# --- real API calls -------------------------------------------------------------------------


def api_list(call: Callable[..., Any], **kwargs: Any) -> ListFn:
    """A list call returning raw JSON objects (no model classes, no lossy conversion)."""

    def run() -> tuple[list[Object], str]:
        response = call(_preload_content=False, **kwargs)
        document = json.loads(response.data)
        return list(document.get("items", [])), str(document["metadata"]["resourceVersion"])

    return run


def api_watch(call: Callable[..., Any], timeout_seconds: int = 300, **kwargs: Any) -> WatchFn:
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    # The kubernetes client is untyped; keep the Any at this one boundary.
    watcher_class: Any = watch.Watch

    def run(resource_version: str) -> Iterator[Object]:
        stream = watcher_class().stream(
            call,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            **kwargs,
        )
        try:
            for event in stream:
                yield {"type": event["type"], "object": event["raw_object"]}
        except ApiException as exc:
            if exc.status == GONE:
                raise Gone(str(exc.reason)) from None
            raise

    return run


@dataclass(frozen=True)
class ClusterInputs:
    """Policies and pods as a cluster's API has them, read once (`steer explain`)."""

    policies: tuple[HTTPPolicy, ...]
    errors: tuple[PolicyError, ...]
    pods: list[Pod]


def read_cluster_inputs(api_client: Any) -> ClusterInputs:
    """One list of every HTTPPolicy, pod and namespace, turned into the model the same way
    the control plane and the agents turn them (steer.source.kubeobjects)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    pods, _ = api_list(core.list_pod_for_all_namespaces)()
    namespaces, _ = api_list(core.list_namespace)()
    objects, _ = api_list(
        custom.list_cluster_custom_object,
        group=API_GROUP,
        version=API_VERSION,
        plural=POLICY_PLURAL,
    )()
    read = [policy_from_object(o) for o in objects]
    return ClusterInputs(
        tuple(r.policy for r in read if r.policy is not None),
        tuple(e for r in read for e in r.errors),
        pods_from_objects(pods, namespaces),
    )
