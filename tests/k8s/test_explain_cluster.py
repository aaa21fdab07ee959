"""`steer explain --kubeconfig`: the verdicts from a cluster's own HTTPPolicies and pods,
read through a real API server and turned into the model as the control plane does."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from steer.cli import main
from steer.constants import ANNOTATION_INJECT, API_GROUP, API_VERSION, POLICY_PLURAL
from tests.k8s.test_apiserver_harness import delete_namespace, unique

pytestmark = pytest.mark.usefixtures("crd")

IPS = {"client": "10.77.0.2", "web": "10.77.0.3"}


def policy(name: str, rules: list[dict[str, Any]], app: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "HTTPPolicy",
        "metadata": {"name": name},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": {"defaultAction": "Deny", "rules": rules},
        },
    }


@pytest.fixture
def cluster(kube_api: client.ApiClient) -> Iterator[str]:
    core, custom = client.CoreV1Api(kube_api), client.CustomObjectsApi(kube_api)
    namespace = unique("steer-explain")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    try:
        for name, ip in IPS.items():
            core.create_namespaced_pod(
                namespace,
                client.V1Pod(
                    metadata=client.V1ObjectMeta(
                        name=name,
                        labels={"app": name},
                        annotations={ANNOTATION_INJECT: "enabled"},
                    ),
                    spec=client.V1PodSpec(
                        node_name="node-a",
                        containers=[client.V1Container(name=name, image="registry.local/x:1")],
                    ),
                ),
            )
            core.patch_namespaced_pod_status(
                name, namespace, {"status": {"phase": "Running", "podIP": ip}}
            )
        public = {
            "name": "public",
            "ports": [{"port": 8080}],
            "http": {"paths": [{"prefix": "/public/"}]},
        }
        custom.create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, POLICY_PLURAL, policy("web", [public])
        )
        yield namespace
    finally:
        delete_namespace(core, namespace)


def explain(kubeconfig: Path, namespace: str, path: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "explain", "--json", "--kubeconfig", str(kubeconfig),
                "--from", f"{namespace}/client", "--to", f"{namespace}/web:8080",
                "--path", path,
            ]
        )  # fmt: skip
    return code, json.loads(out.getvalue())


def test_explain_reads_the_clusters_policies_and_pods(kubeconfig: Path, cluster: str) -> None:
    code, allowed = explain(kubeconfig, cluster, "/public/page")
    assert code == 0
    assert (allowed["l4"], allowed["via_envoy"], allowed["http"]) == ("allowed", True, "allowed")
    assert (allowed["policy"], allowed["rule"]) == (f"{cluster}/web", "public")
    _, denied = explain(kubeconfig, cluster, "/admin")
    assert (denied["http"], denied["status"], denied["rule"]) == ("denied", 403, "default-deny")


def test_an_unknown_pod_names_where_it_looked(
    kubeconfig: Path, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["explain", "--kubeconfig", str(kubeconfig), "--from", f"{cluster}/nobody",
         "--to", f"{cluster}/web:8080"]
    )  # fmt: skip
    assert code == 2
    assert "in the cluster" in capsys.readouterr().err
