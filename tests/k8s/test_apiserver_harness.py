"""The Kubernetes test harness itself: the API that tests/k8s get is real and complete
enough for steer's control plane (versions, namespaces, CRDs with status, watches).

Every object is uniquely named and removed afterwards, so this also runs against a shared
cluster through $KUBECONFIG.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

NOT_FOUND = 404


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def delete_namespace(core: client.CoreV1Api, name: str) -> None:
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != NOT_FOUND:
            raise


@pytest.fixture
def core(kube_api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube_api)


def test_server_version(kube_api: client.ApiClient) -> None:
    info = client.VersionApi(kube_api).get_code()
    assert info.major == "1"
    assert info.git_version.startswith("v1.")
    if "KUBECONFIG" not in os.environ:
        assert info.git_version.startswith("v1.20.")


def test_create_and_delete_namespace(core: client.CoreV1Api) -> None:
    name = unique("steer-harness")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        assert core.read_namespace(name).status.phase == "Active"
        assert name in {ns.metadata.name for ns in core.list_namespace().items}
    finally:
        delete_namespace(core, name)
    # Gone, or (without a namespace controller, as on the local apiserver) Terminating.
    try:
        remaining = core.read_namespace(name)
    except ApiException as exc:
        assert exc.status == NOT_FOUND
    else:
        assert remaining.metadata.deletion_timestamp is not None
        assert remaining.status.phase == "Terminating"


def test_watch_sees_added_namespace(core: client.CoreV1Api) -> None:
    # Watching from the list's resourceVersion sees everything after it, so the namespace
    # may be created before the watch starts and no thread is needed.
    resource_version = core.list_namespace().metadata.resource_version
    name = unique("steer-watch")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        seen = []
        stream = watch.Watch()
        for event in stream.stream(
            core.list_namespace, resource_version=resource_version, timeout_seconds=10
        ):
            seen.append((event["type"], event["object"].metadata.name))
            if seen[-1] == ("ADDED", name):
                stream.stop()
        assert ("ADDED", name) in seen
    finally:
        delete_namespace(core, name)


@pytest.fixture
def widget_crd(kube_api: client.ApiClient) -> Iterator[tuple[str, str]]:
    """A tiny cluster-scoped CRD with a status subresource, Established; (group, plural).

    The group is unique per run, so a run that died before cleaning up cannot get in the way.
    """
    group = f"{unique('t')}.harness.steer.test"
    plural = "widgets"
    crd: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Cluster",
            "names": {"plural": plural, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer"}},
                                },
                                "status": {
                                    "type": "object",
                                    "properties": {"ready": {"type": "boolean"}},
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    ext = client.ApiextensionsV1Api(kube_api)
    ext.create_custom_resource_definition(crd)
    try:
        deadline = time.monotonic() + 30
        while not established(ext.read_custom_resource_definition(crd["metadata"]["name"])):
            assert time.monotonic() < deadline, "CRD not Established after 30s"
            time.sleep(0.2)
        yield group, plural
    finally:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])


def established(crd: client.V1CustomResourceDefinition) -> bool:
    conditions = (crd.status and crd.status.conditions) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def test_custom_resource_status_subresource(
    kube_api: client.ApiClient, widget_crd: tuple[str, str]
) -> None:
    group, plural = widget_crd
    custom = client.CustomObjectsApi(kube_api)
    name = unique("w")
    body = {
        "apiVersion": f"{group}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"size": 3},
        "status": {"ready": True},
    }
    created = custom.create_cluster_custom_object(group, "v1", plural, body)
    try:
        # With a status subresource, the main resource ignores status...
        assert "status" not in created or not created["status"].get("ready")
        patched = custom.patch_cluster_custom_object_status(
            group, "v1", plural, name, {"status": {"ready": True}, "spec": {"size": 7}}
        )
        # ...and the status subresource ignores everything but status.
        assert patched["status"] == {"ready": True}
        assert patched["spec"] == {"size": 3}
        fetched = custom.get_cluster_custom_object(group, "v1", plural, name)
        assert fetched["status"] == {"ready": True}
    finally:
        custom.delete_cluster_custom_object(group, "v1", plural, name)
