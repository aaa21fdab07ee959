"""Fixtures for tests against a real Kubernetes API.

`kubeconfig` points at, in order of preference: the cluster that $KUBECONFIG names (a real
cluster or apiserver: tests must create uniquely named objects and clean them up), or a
kube-apiserver + etcd started on loopback for the session from the binary that
`make kube-apiserver` caches; with neither, the tests are skipped.

The local apiserver has no controller-manager, scheduler or kubelet: pods stay Pending and
deleted namespaces stay Terminating; tests must not wait for either.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.k8s.kubeapi import cached_apiserver, eventually, running_apiserver

CRD = Path(__file__).parents[2] / "manifests" / "crd" / "httppolicies.steer.dev.yaml"


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if env := os.environ.get("KUBECONFIG"):
        # KUBECONFIG may list several files to merge; the client takes one, so the first.
        yield Path(env.split(os.pathsep)[0])
        return
    if cached_apiserver() is None:
        pytest.skip(
            "no kube-apiserver: set KUBECONFIG, or run `make kube-apiserver` to build one"
            " (about 12 minutes)"
        )
    with running_apiserver(tmp_path_factory.mktemp("kubeapi")) as server:
        yield server.kubeconfig


@pytest.fixture(scope="module")
def kube_api(kubeconfig: Path) -> Iterator[client.ApiClient]:
    # persist_config=False: never write back into a user's kubeconfig.
    api = config.new_client_from_config(config_file=str(kubeconfig), persist_config=False)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="module")
def crd(kube_api: client.ApiClient) -> None:
    """steer's HTTPPolicy CRD, installed from manifests/ and established."""
    ext = client.ApiextensionsV1Api(kube_api)
    body = yaml.safe_load(CRD.read_text())
    with contextlib.suppress(ApiException):
        ext.create_custom_resource_definition(body)

    def established() -> bool:
        got = ext.read_custom_resource_definition(body["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in got.status.conditions or []
        )

    eventually(established, "the CRD to be established", timeout=30)
