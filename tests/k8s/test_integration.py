"""steer against a real kube-apiserver: the control plane (informers, xDS, policy status,
admission webhooks over TLS), a real Envoy, and the node agent (its datapath in a lab node
namespace), end to end.

The API server has no scheduler or kubelet, so the test plays the kubelet's one part that
matters here: it gives the pod an address. Everything else is steer's own doing: the
webhook adds the readiness gate, the control plane renders the pod's routes and the agent
sets the gate's condition once Envoy has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from steer.constants import (
    API_GROUP,
    API_VERSION,
    LAB_GATEWAY_IP,
    NODE_NETNS,
    POLICY_PLURAL,
    READINESS_GATE,
)
from steer.control.certs import ca_bundle_b64, generate
from steer.control.kubeplane import KubeControlPlane
from steer.control.webhook import build_app, kube_namespace_labels, serve_webhook
from steer.lab.updown import lab_down, lab_up
from steer.node.bpfobjects import BpfObjects
from steer.node.cgroups import cgroup2_root
from steer.node.datapath import NodeDatapath
from steer.node.envoy import wait_ready
from steer.node.kernel import HostKernel
from steer.node.kubeagent import KubeAgent
from steer.node.netns import run_in_netns
from tests.k8s.kubeapi import eventually

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]
NODE = "node-it"
POD_IP = "10.244.7.7"


@contextlib.contextmanager
def background_loop(coroutine: Callable[[], Any]) -> Iterator[None]:
    """Run an asyncio program in a thread until the block ends."""
    loop = asyncio.new_event_loop()
    task: list[asyncio.Task[Any]] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(coroutine()))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(lambda: task and task[0].cancel())
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def agent_status_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the agent writes the status `steer status` reads (not the host's /run/steer)."""
    return tmp_path_factory.mktemp("steer-agent") / "agent-status.json"


@pytest.fixture(scope="module")
def steer_up(
    kube_api: client.ApiClient,
    crd: None,
    tmp_path_factory: pytest.TempPathFactory,
    agent_status_file: Path,
) -> Iterator[str]:
    """Control plane + webhooks + Envoy + agent, wired to the API server. Yields the test
    namespace (opted in)."""
    api = kube_api
    work = tmp_path_factory.mktemp("steer-k8s")
    namespace = f"steer-it-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    admission = client.AdmissionregistrationV1Api(api)
    certs = generate("steer-control", "steer-system", work / "tls")
    port = _free_port()
    socket_path = work / "xds.sock"
    lab = lab_up([])
    plane = KubeControlPlane(api)

    async def control_plane() -> None:
        async def webhook() -> None:
            app = build_app(kube_namespace_labels(api))
            await serve_webhook(app, "127.0.0.1", port, certs.cert, certs.key)

        await plane.run(None, socket_path, webhook)

    envoy: subprocess.Popen[bytes] | None = None
    agent_thread: threading.Thread | None = None
    stop = threading.Event()
    webhooks = _webhook_configurations(port, ca_bundle_b64(certs.ca), namespace)
    try:
        with background_loop(control_plane), contextlib.ExitStack() as stack:
            core.create_namespace(
                client.V1Namespace(
                    metadata=client.V1ObjectMeta(
                        name=namespace,
                        labels={"steer.dev/inject": "enabled", "steer-it": namespace},
                    )
                )
            )
            for kind, body in webhooks:
                getattr(admission, f"create_{kind}")(body)
            eventually(socket_path.exists, "the xDS socket")
            envoy_log = stack.enter_context((work / "envoy.log").open("wb"))
            envoy = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "steer.cli",
                    "envoy",
                    "--netns",
                    NODE_NETNS,
                    "--socket",
                    str(socket_path),
                    "--node-id",
                    NODE,
                    "--cgroup",
                    lab.node_cgroup,
                ],
                stdout=envoy_log,
                stderr=subprocess.STDOUT,
            )
            agent = KubeAgent(
                api,
                NODE,
                cgroup2_root(),
                NodeDatapath(envoy_ip=LAB_GATEWAY_IP),
                envoy_cgroup=lab.node_cgroup,
                datapath_netns=NODE_NETNS,
                status_file=agent_status_file,
            )
            agent_thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
            agent_thread.start()
            run_in_netns(NODE_NETNS, lambda: wait_ready(timeout=30))
            yield namespace
    finally:
        stop.set()
        if agent_thread is not None:
            agent_thread.join(timeout=10)
        if envoy is not None:
            envoy.terminate()
            envoy.wait(timeout=10)
        for kind, body in webhooks:
            with contextlib.suppress(ApiException):
                getattr(admission, f"delete_{kind}")(body["metadata"]["name"])
        with contextlib.suppress(ApiException):
            core.delete_namespace(namespace)
        # The agent leaves its BPF objects pinned on purpose (a restarted agent adopts
        # them); the test's own must go with it.
        BpfObjects.unload_all(HostKernel())
        lab_down()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WEBHOOKS = Path(__file__).parents[2] / "manifests" / "webhooks.yaml"


def _webhook_configurations(port: int, ca: str, namespace: str) -> list[tuple[str, Any]]:
    """The manifests' own webhook configurations, pointed at this test's server by URL
    (the local API server has no Services to route through) and narrowed to this test's
    namespace, so on a real cluster nothing else is touched."""
    out = []
    for document in yaml.safe_load_all(WEBHOOKS.read_text()):
        document["metadata"] = {"name": f"{document['metadata']['name']}-{namespace}"}
        for webhook in document["webhooks"]:
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
            webhook["namespaceSelector"] = {"matchLabels": {"steer-it": namespace}}
        kind = "mutating" if document["kind"].startswith("Mutating") else "validating"
        out.append((f"{kind}_webhook_configuration", document))
    return out


def policy(namespace: str, name: str, http: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "HTTPPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": {
                "defaultAction": "Deny",
                "rules": [{"ports": [{"port": 8080}], "http": http}],
            },
        },
    }


def web_pod(name: str, annotations: dict[str, str] | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": "web"}, annotations=annotations),
        spec=client.V1PodSpec(
            node_name=NODE,  # no scheduler here: bound at creation, as a DaemonSet's would be
            containers=[client.V1Container(name="web", image="registry.local/web:1")],
        ),
    )


def test_policy_is_accepted_and_programmed(kube_api: client.ApiClient, steer_up: str) -> None:
    custom = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        steer_up,
        POLICY_PLURAL,
        policy(steer_up, "web", {"methods": ["GET"], "paths": [{"prefix": "/public/"}]}),
    )

    def conditions() -> dict[str, str] | None:
        got = custom.get_namespaced_custom_object(
            API_GROUP, API_VERSION, steer_up, POLICY_PLURAL, "web"
        )
        found = {c["type"]: c["status"] for c in got.get("status", {}).get("conditions", [])}
        return found if found.get("Programmed") == "True" else None

    # PodsProtected: every pod the policy selects is steered.
    assert eventually(conditions, "Accepted and Programmed") == {
        "Accepted": "True",
        "Programmed": "True",
        "PodsProtected": "True",
    }


def test_invalid_policy_is_refused_by_the_validating_webhook(
    kube_api: client.ApiClient, steer_up: str
) -> None:
    custom = client.CustomObjectsApi(kube_api)
    bad = policy(steer_up, "bad", {"paths": [{"regex": "(unclosed"}]})
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(API_GROUP, API_VERSION, steer_up, POLICY_PLURAL, bad)
    assert "spec.ingress.rules[0].http.paths[0]" in str(refused.value.body)
    assert "is refused by RE2" in str(refused.value.body)


def test_bad_annotation_is_refused_with_the_fix(kube_api: client.ApiClient, steer_up: str) -> None:
    core = client.CoreV1Api(kube_api)
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(steer_up, web_pod("bad", {"steer.dev/dataplane": "fast"}))
    body = str(refused.value.body)
    assert "steer.dev/dataplane" in body and "fix" in body


def test_pod_is_mutated_and_its_readiness_gate_opens_once_steered(
    kube_api: client.ApiClient, steer_up: str
) -> None:
    core = client.CoreV1Api(kube_api)
    created = core.create_namespaced_pod(steer_up, web_pod("web"))
    assert [g.condition_type for g in created.spec.readiness_gates or []] == [READINESS_GATE]
    assert created.metadata.annotations["steer.dev/dataplane"] == "auto"

    # The kubelet's part: the pod runs and has an address.
    core.patch_namespaced_pod_status(
        "web",
        steer_up,
        {"status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}]}},
    )

    def gate() -> str | None:
        pod = core.read_namespaced_pod("web", steer_up)
        found = [c for c in pod.status.conditions or [] if c.type == READINESS_GATE]
        return found[0].status if found else None

    assert eventually(gate, "the agent to set the readiness gate", timeout=45) == "True"


def test_agent_status_shows_its_node_and_pods_with_their_gates(
    kube_api: client.ApiClient, steer_up: str, agent_status_file: Path
) -> None:
    """The status `steer status` reads in the agent's container, written after each sync:
    this node's pods (the one the previous test made steered and Ready), its gate."""
    import json

    def web() -> dict[str, Any] | None:
        try:
            document = json.loads(agent_status_file.read_text())
        except FileNotFoundError:  # no sync yet
            return None
        found = [p for p in document["pods"] if (p["namespace"], p["name"]) == (steer_up, "web")]
        return document if found and found[0].get("readiness_gate") == "True" else None

    document = eventually(web, "the agent's status to show web's gate set", timeout=45)
    assert (document["mode"], document["node"]) == ("kubernetes", NODE)
    [pod] = [p for p in document["pods"] if p["name"] == "web" and p["namespace"] == steer_up]
    assert pod["ip"] == POD_IP
    assert pod["dataplane"] in {"iptables", "ebpf"}
    assert document["gates_waiting"] == 0
    assert document["ruleset_digest"]
    assert document["lock"] == f"{agent_status_file}.lock"
