"""The Kubernetes manifests, checked offline: no cluster, no network.

Every object the kustomization lists is validated against the OpenAPI schemas that
kubernetes-validate ships, strictly (an unknown field fails), for Kubernetes 1.20 (the
oldest release steer supports) and for the newest release the package knows. On top of
the schemas, steer's own rules: least privilege for the node DaemonSet and the RBAC, a
comment saying why for every capability and host path, webhooks that fail closed, and
ports and names that agree with steer.constants.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import (
    SchemaNotFoundError,
    all_versions,
    latest_version,
    major_minor,
)

from steer.constants import (
    ANNOTATION_INJECT,
    API_GROUP,
    API_VERSION,
    CONTROL_METRICS_PORT,
    CONTROL_SERVICE,
    ENVOY_ADMIN_SOCKET,
    ENVOY_INBOUND_PORT,
    ENVOY_OUTBOUND_PORT,
    HOST_PROC_SYS_NET,
    LEADER_LEASE_NAME,
    METRICS_PORT,
    MUTATING_WEBHOOK_NAME,
    POLICY_PLURAL,
    SYSTEM_NAMESPACE,
    VALIDATING_WEBHOOK_NAME,
    WEBHOOK_MUTATE_PODS_PATH,
    WEBHOOK_PORT,
    WEBHOOK_VALIDATE_POLICIES_PATH,
    XDS_NODE_TLS_DIR,
    XDS_PORT,
    XDS_SERVER_TLS_DIR,
)

ROOT = Path(__file__).parents[2]
MANIFESTS = ROOT / "manifests"
CRD_FILE = "crd/httppolicies.steer.dev.yaml"
IMAGE = "ghcr.io/steer-dev/steer"

OLDEST_SUPPORTED = "1.20"
SCHEMA_VERSIONS = (OLDEST_SUPPORTED, major_minor(latest_version()))

# GA API groups that exist in 1.20 and are still served today: nothing deprecated.
STABLE_API_VERSIONS = frozenset(
    {
        "v1",
        "apps/v1",
        "rbac.authorization.k8s.io/v1",
        "admissionregistration.k8s.io/v1",
        "apiextensions.k8s.io/v1",
    }
)
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)
# The fields of kustomize v2.0.3, built into kubectl up to 1.20 (`kubectl apply -k`).
KUSTOMIZE_2_0_FIELDS = frozenset({"apiVersion", "kind", "namespace", "resources", "images"})

# The only capabilities the node agent may add; each needs a comment in node.yaml.
AGENT_CAPABILITIES = frozenset(
    {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"}
)
NODE_HOST_PATHS = {
    "/sys/fs/bpf",
    "/sys/fs/cgroup",
    "/lib/modules",
    "/usr/src",
    "/run/netns",
    "/run/steer",
    "/run/xtables.lock",
}
# Host paths the agent sees elsewhere: where its own would be read-only.
NODE_HOST_PATHS_MOVED = {"/proc/sys/net": str(HOST_PROC_SYS_NET)}
# Envoy's only host path besides /run/steer: the node's own xDS client certificate.
ENVOY_HOST_PATHS = {"/run/steer", str(XDS_NODE_TLS_DIR)}


# --- loading: the kustomization, applied the way kustomize would ---------------------------


@dataclass(frozen=True)
class Doc:
    file: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def id(self) -> str:
        return f"{self.file}:{self.kind}/{self.name}"


def load_kustomization(directory: Path = MANIFESTS) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _split_image(image: str) -> tuple[str, str]:
    """`registry:5000/name:tag@digest` -> (`registry:5000/name`, `:tag@digest`)."""
    name, at, digest = image.partition("@")
    base, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:  # no tag; the colon, if any, was a registry port
        return name, at + digest
    return base, f":{tag}{at}{digest}"


def _set_images(obj: dict[str, Any], images: list[dict[str, str]]) -> None:
    """kustomize's `images:`: a container image named `name` gets newName/newTag/digest."""
    for container in _containers(obj):
        name, suffix = _split_image(container["image"])
        for image in images:
            if image["name"] != name:
                continue
            if "digest" in image:
                suffix = f"@{image['digest']}"
            elif "newTag" in image:
                suffix = f":{image['newTag']}"
            container["image"] = image.get("newName", name) + suffix


def load_docs(directory: Path = MANIFESTS) -> list[Doc]:
    """Every object the kustomization lists, with its namespace and images applied."""
    kustomization = load_kustomization(directory)
    docs = []
    for resource in kustomization["resources"]:
        text = (directory / resource).read_text()
        for obj in yaml.safe_load_all(text):
            if obj is None:
                continue
            if kustomization.get("namespace") and obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
            _set_images(obj, kustomization.get("images", []))
            docs.append(Doc(resource, obj))
    return docs


DOCS = load_docs()
# Applied only to uninstall (docs/install-kubernetes.md), but held to the same rules.
CLEANUP = MANIFESTS / "cleanup"
CLEANUP_DOCS = load_docs(CLEANUP)
ALL_DOCS = DOCS + [Doc(f"cleanup/{d.file}", d.obj) for d in CLEANUP_DOCS]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d.obj for d in DOCS if d.kind == kind and (name is None or d.name == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in _containers(workload) if c["name"] == name]
    assert len(found) == 1, f"no container {name} in {workload['metadata']['name']}"
    return found[0]


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# --- the kustomization ----------------------------------------------------------------------


def _owner(path: Path) -> Path:
    """The nearest directory above `path` with a kustomization: the one that must list it."""
    return next(d for d in path.parents if (d / "kustomization.yaml").exists())


@pytest.mark.parametrize(
    "directory",
    [MANIFESTS, CLEANUP, MANIFESTS / "cert-manager", MANIFESTS / "pdb", MANIFESTS / "pdb-1.20"],
)
def test_kustomization_lists_every_manifest(directory: Path) -> None:
    listed = set(load_kustomization(directory)["resources"])
    on_disk = {
        str(p.relative_to(directory))
        for p in directory.rglob("*.yaml")
        if p.name != "kustomization.yaml" and _owner(p) == directory
    }
    assert listed == on_disk


def test_kustomization_includes_the_generated_crd() -> None:
    assert CRD_FILE in load_kustomization()["resources"]


def test_kustomization_works_with_kubectl_1_20() -> None:
    """kubectl <= 1.20 embeds kustomize 2.0.3, which knows only these fields."""
    kustomization = load_kustomization()
    assert set(kustomization) <= KUSTOMIZE_2_0_FIELDS
    assert kustomization["namespace"] == SYSTEM_NAMESPACE
    assert all(not (MANIFESTS / r).is_dir() for r in kustomization["resources"])


def test_every_container_runs_the_configured_image() -> None:
    images = load_kustomization()["images"]
    assert [i["name"] for i in images] == [IMAGE]
    expected = f"{IMAGE}:{images[0]['newTag']}"
    workloads = [d.obj for d in DOCS if d.kind in {"Deployment", "DaemonSet"}]
    assert {c["image"] for w in workloads for c in _containers(w)} == {expected}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize(
    "directory",
    [MANIFESTS, CLEANUP, MANIFESTS / "pdb", MANIFESTS / "pdb-1.20"],
    ids=["base", "cleanup", "pdb", "pdb-1.20"],
)
def test_loader_agrees_with_kustomize(directory: Path) -> None:
    """The tests' own namespace/images transform matches `kubectl kustomize` exactly."""
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout

    def key(obj: dict[str, Any]) -> tuple[str, str, str]:
        meta = obj["metadata"]
        return obj["kind"], meta.get("namespace", ""), meta["name"]

    theirs = {key(o): o for o in yaml.safe_load_all(built) if o}
    ours = {key(d.obj): d.obj for d in load_docs(directory)}
    assert sorted(theirs) == sorted(ours)
    for k, obj in ours.items():
        assert theirs[k] == obj, f"{k} differs from kustomize's output"


# --- schemas: 1.20 and the newest known, strictly -----------------------------------------


def test_schemas_for_both_ends_are_shipped() -> None:
    shipped = {major_minor(v) for v in all_versions()}
    assert OLDEST_SUPPORTED in shipped, (
        f"kubernetes-validate {kubernetes_validate.__version__} no longer ships the "
        f"{OLDEST_SUPPORTED} schemas; keep the dev extra on a release that does"
    )
    assert SCHEMA_VERSIONS[1] != OLDEST_SUPPORTED


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda d: d.id)
def test_valid_against_schema(doc: Doc, version: str) -> None:
    try:
        validated = kubernetes_validate.validate(doc.obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        pytest.fail(f"{doc.id} is invalid for Kubernetes {version} at {where}: {e.message}")
    assert validated == version


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda d: d.id)
def test_only_stable_apis(doc: Doc) -> None:
    assert doc.obj["apiVersion"] in STABLE_API_VERSIONS


def test_strict_validation_catches_unknown_fields() -> None:
    """Guards the test above: a field 1.20 does not know must fail there."""
    webhooks = only("ValidatingWebhookConfiguration")
    newer = {**webhooks, "webhooks": [{**webhooks["webhooks"][0], "matchConditions": []}]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(newer, OLDEST_SUPPORTED, strict=True)


# --- namespace ----------------------------------------------------------------------------


def test_system_namespace_is_never_steered_and_admits_the_node_pods() -> None:
    labels = only("Namespace", SYSTEM_NAMESPACE)["metadata"]["labels"]
    assert labels[ANNOTATION_INJECT] == "disabled"
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    namespaced = [d for d in DOCS if d.kind not in CLUSTER_SCOPED]
    assert {d.obj["metadata"]["namespace"] for d in namespaced} == {SYSTEM_NAMESPACE}


# --- the node DaemonSet: least privilege -------------------------------------------------


NODE = only("DaemonSet", "steer-node")
NODE_POD = NODE["spec"]["template"]["spec"]
[CLEANUP_NODE] = [d.obj for d in CLEANUP_DOCS if d.kind == "DaemonSet"]


def test_node_pod_shares_the_nodes_network_and_processes() -> None:
    assert NODE_POD["hostNetwork"] is True
    assert NODE_POD["hostPID"] is True
    assert NODE_POD["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert NODE_POD["priorityClassName"] == "system-node-critical"
    assert NODE_POD["serviceAccountName"] == "steer-node"
    assert {"operator": "Exists"} in NODE_POD["tolerations"]
    assert NODE["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }


@pytest.mark.parametrize(
    ("workload", "name"),
    [(NODE, "agent"), (NODE, "envoy"), (CLEANUP_NODE, "cleanup")],
    ids=["agent", "envoy", "cleanup"],
)
def test_host_containers_are_not_privileged(workload: dict[str, Any], name: str) -> None:
    security = container(workload, name)["securityContext"]
    assert security.get("privileged", False) is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"].get("add", [])) <= AGENT_CAPABILITIES
    for mount in container(workload, name).get("volumeMounts", []):
        # The API server refuses Bidirectional propagation outside privileged containers.
        assert mount.get("mountPropagation") != "Bidirectional", mount["name"]


def test_agent_adds_only_the_capabilities_it_needs() -> None:
    added = container(NODE, "agent")["securityContext"]["capabilities"]["add"]
    assert set(added) == AGENT_CAPABILITIES


def test_envoy_adds_no_capability() -> None:
    capabilities = container(NODE, "envoy")["securityContext"]["capabilities"]
    assert "add" not in capabilities


def test_node_host_paths() -> None:
    host_paths = {v["hostPath"]["path"] for v in NODE_POD["volumes"] if "hostPath" in v}
    assert host_paths == NODE_HOST_PATHS | set(NODE_HOST_PATHS_MOVED) | ENVOY_HOST_PATHS
    mounts = {m["mountPath"]: m for m in container(NODE, "agent")["volumeMounts"]}
    assert set(mounts) == NODE_HOST_PATHS | set(NODE_HOST_PATHS_MOVED.values())
    volumes = {v["name"]: v for v in NODE_POD["volumes"]}
    for mount in mounts.values():
        host_path = volumes[mount["name"]]["hostPath"]["path"]
        assert NODE_HOST_PATHS_MOVED.get(host_path, host_path) == mount["mountPath"]
    assert mounts["/sys/fs/cgroup"].get("readOnly", False) is False
    assert mounts["/lib/modules"]["readOnly"] is True
    assert mounts["/usr/src"]["readOnly"] is True
    envoy_mounts = {m["mountPath"]: m for m in container(NODE, "envoy")["volumeMounts"]}
    assert set(envoy_mounts) == ENVOY_HOST_PATHS
    assert envoy_mounts[str(XDS_NODE_TLS_DIR)]["readOnly"] is True


def _commented(lines: list[str], index: int) -> bool:
    """A line explains itself: an inline comment, or a comment line right above it."""
    return "#" in lines[index] or lines[index - 1].strip().startswith("#")


HOST_WORKLOADS = [("node.yaml", NODE), ("cleanup/node-cleanup.yaml", CLEANUP_NODE)]


@pytest.mark.parametrize(("file", "workload"), HOST_WORKLOADS, ids=["node", "cleanup"])
def test_every_capability_has_a_comment(file: str, workload: dict[str, Any]) -> None:
    lines = (MANIFESTS / file).read_text().splitlines()
    for c in _containers(workload):
        for capability in c["securityContext"]["capabilities"].get("add", []):
            found = [i for i, ln in enumerate(lines) if re.fullmatch(rf"\s*- {capability}\b.*", ln)]
            assert len(found) == 1, capability
            assert _commented(lines, found[0]), f"capability {capability} has no comment"


@pytest.mark.parametrize(("file", "workload"), HOST_WORKLOADS, ids=["node", "cleanup"])
def test_every_host_path_has_a_comment(file: str, workload: dict[str, Any]) -> None:
    lines = (MANIFESTS / file).read_text().splitlines()
    pod = workload["spec"]["template"]["spec"]
    volumes = [v["name"] for v in pod["volumes"] if "hostPath" in v]
    for name in volumes:
        found = [
            i
            for i, ln in enumerate(lines)
            if re.fullmatch(rf"\s*- name: {name}\s*", ln) and "hostPath:" in lines[i + 1]
        ]
        assert len(found) == 1, name
        assert _commented(lines, found[0]), f"hostPath volume {name} has no comment"


def test_node_container_args_follow_the_cli_contract() -> None:
    agent = container(NODE, "agent")
    assert agent["args"] == [
        *("agent", "--kube", "--node-name", "$(NODE_NAME)"),
        *("--envoy-ip", "$(NODE_IP)", "--netns", ""),
        *("--envoy-admin", str(ENVOY_ADMIN_SOCKET)),
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {
        "NODE_NAME": "spec.nodeName",
        "NODE_IP": "status.hostIP",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    envoy = container(NODE, "envoy")
    assert envoy["args"] == [
        "envoy",
        *("--log-path", "-"),  # Envoy's own log to the container's: kubectl logs
        "--netns",
        "",
        "--xds-address",
        f"{CONTROL_SERVICE}.{SYSTEM_NAMESPACE}.svc:{XDS_PORT}",
        "--node-id",
        "$(NODE_NAME)",
        "--cgroup",
        "",
        *("--xds-client-cert", f"{XDS_NODE_TLS_DIR}/tls.crt"),
        *("--xds-client-key", f"{XDS_NODE_TLS_DIR}/tls.key"),
        *("--xds-ca", f"{XDS_NODE_TLS_DIR}/ca.crt"),
        *("--admin-socket", str(ENVOY_ADMIN_SOCKET)),
    ]
    for c in (agent, envoy):
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_agent_serves_metrics_on_the_reserved_port() -> None:
    agent = container(NODE, "agent")
    assert [p["containerPort"] for p in agent["ports"]] == [METRICS_PORT]
    annotations = NODE["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_envoy_ports_and_readiness_match_constants() -> None:
    envoy = container(NODE, "envoy")
    assert {p["containerPort"] for p in envoy["ports"]} == {
        ENVOY_OUTBOUND_PORT,
        ENVOY_INBOUND_PORT,
    }
    probe = envoy["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python3", "-c"]
    assert f"admin_get('/ready', '{ENVOY_ADMIN_SOCKET}')" in probe[2]
    assert "15000" not in " ".join(probe)


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_every_container_has_requests_and_a_memory_limit(kind: str) -> None:
    for c in _containers(only(kind)):
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), c["name"]
        assert "memory" in resources["limits"], c["name"]


# --- the control plane --------------------------------------------------------------------


CONTROL = only("Deployment", CONTROL_SERVICE)
CONTROL_CONTAINER = container(CONTROL, "control")


def test_control_plane_ports_match_constants() -> None:
    args = CONTROL_CONTAINER["args"]
    assert args[:2] == ["control", "--kube"]
    assert int(arg_value(args, "--xds-port")) == XDS_PORT
    assert int(arg_value(args, "--webhook-port")) == WEBHOOK_PORT
    ports = {p["name"]: p["containerPort"] for p in CONTROL_CONTAINER["ports"]}
    assert sorted(ports.values()) == sorted([XDS_PORT, WEBHOOK_PORT, CONTROL_METRICS_PORT])
    annotations = CONTROL["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(CONTROL_METRICS_PORT)

    probe = CONTROL_CONTAINER["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": WEBHOOK_PORT, "scheme": "HTTPS"}

    service = only("Service", CONTROL_SERVICE)
    assert service["metadata"]["namespace"] == SYSTEM_NAMESPACE
    served = {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert served == {XDS_PORT: XDS_PORT, 443: WEBHOOK_PORT}
    pod_labels = CONTROL["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_control_plane_mounts_the_webhook_certificate() -> None:
    args = CONTROL_CONTAINER["args"]
    assert arg_value(args, "--webhook-cert") == "/etc/steer/tls/tls.crt"
    assert arg_value(args, "--webhook-key") == "/etc/steer/tls/tls.key"
    mounts = {m["name"]: m for m in CONTROL_CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v for v in CONTROL["spec"]["template"]["spec"]["volumes"]}
    tls = next(n for n, m in mounts.items() if m["mountPath"] == "/etc/steer/tls")
    assert volumes[tls]["secret"]["secretName"] == "steer-webhook-tls"
    assert not [d for d in DOCS if d.kind == "Secret"], "key material must not be committed"


def test_control_plane_serves_xds_over_mutual_tls() -> None:
    args = CONTROL_CONTAINER["args"]
    assert arg_value(args, "--xds-cert") == f"{XDS_SERVER_TLS_DIR}/tls.crt"
    assert arg_value(args, "--xds-key") == f"{XDS_SERVER_TLS_DIR}/tls.key"
    assert arg_value(args, "--xds-client-ca") == f"{XDS_SERVER_TLS_DIR}/ca.crt"
    mounts = {m["mountPath"]: m for m in CONTROL_CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v for v in CONTROL["spec"]["template"]["spec"]["volumes"]}
    mount = mounts[str(XDS_SERVER_TLS_DIR)]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["secret"]["secretName"] == "steer-xds-tls"


def test_the_cli_accepts_the_manifests_arguments() -> None:
    """The flags the manifests pass exist: a typo would crash-loop the pods."""
    from steer.cli import build_parser

    parser = build_parser()
    for args in (
        CONTROL_CONTAINER["args"],
        container(NODE, "agent")["args"],
        container(NODE, "envoy")["args"],
    ):
        parser.parse_args(args)


# --- the control plane: high availability ---------------------------------------------------


PDB_V1 = load_docs(MANIFESTS / "pdb")
PDB_1_20 = load_docs(MANIFESTS / "pdb-1.20")


def test_control_plane_runs_two_replicas_on_different_nodes_where_possible() -> None:
    assert CONTROL["spec"]["replicas"] == 2
    rolling = CONTROL["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)
    pod = CONTROL["spec"]["template"]
    [term] = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector == CONTROL["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()


def test_control_plane_elects_a_writer_named_by_the_downward_api() -> None:
    assert "--leader-elect" in CONTROL_CONTAINER["args"]
    # The defaults name the Lease the Role grants (no --lease-name override here).
    assert "--lease-name" not in CONTROL_CONTAINER["args"]
    env = {e["name"]: e for e in CONTROL_CONTAINER["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_control_plane_probes_ask_the_webhook_server() -> None:
    healthz = {"path": "/healthz", "port": WEBHOOK_PORT, "scheme": "HTTPS"}
    assert CONTROL_CONTAINER["readinessProbe"]["httpGet"] == healthz
    liveness = CONTROL_CONTAINER["livenessProbe"]
    assert liveness["httpGet"] == healthz
    # A slow start must not be killed: liveness gives it longer than readiness does.
    assert liveness["initialDelaySeconds"] >= 15


@pytest.mark.parametrize(
    ("docs", "versions"),
    [(PDB_V1, ("1.21", SCHEMA_VERSIONS[1])), (PDB_1_20, (OLDEST_SUPPORTED, "1.24"))],
    ids=["policy-v1", "policy-v1beta1"],
)
def test_pod_disruption_budget_keeps_one_control_plane_replica(
    docs: list[Doc], versions: tuple[str, ...]
) -> None:
    [pdb] = [d.obj for d in docs]
    assert pdb["kind"] == "PodDisruptionBudget"
    assert pdb["metadata"]["name"] == CONTROL_SERVICE
    assert pdb["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert pdb["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": CONTROL["spec"]["selector"]["matchLabels"]},
    }
    assert pdb["spec"]["minAvailable"] < CONTROL["spec"]["replicas"], "would block every drain"
    for version in versions:
        assert kubernetes_validate.validate(pdb, version, strict=True) == version


def test_pod_disruption_budget_api_versions_cover_every_supported_release() -> None:
    """policy/v1 from 1.21, policy/v1beta1 up to 1.24: between them, every release."""
    [v1] = [d.obj for d in PDB_V1]
    [beta] = [d.obj for d in PDB_1_20]
    assert (v1["apiVersion"], beta["apiVersion"]) == ("policy/v1", "policy/v1beta1")
    # Neither one alone will do, hence two directories rather than one in the base.
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate(v1, OLDEST_SUPPORTED, strict=True)
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate(beta, "1.25", strict=True)
    assert {**beta, "apiVersion": "policy/v1"} == v1


def test_control_plane_needs_no_privilege() -> None:
    pod = CONTROL["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "steer-control"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert not [v for v in pod["volumes"] if "hostPath" in v]
    security = CONTROL_CONTAINER["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True


# --- RBAC: least privilege ------------------------------------------------------------------


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _expand(groups: list[str], resources: list[str], verbs: list[str]) -> set[tuple[str, ...]]:
    return {(g, r, v) for g in groups for r in resources for v in verbs}


EVENTS = _expand(["", "events.k8s.io"], ["events"], ["create", "patch"])
EXPECTED_GRANTS = {
    "steer-control": _expand([API_GROUP], [POLICY_PLURAL], ["get", "list", "watch"])
    | _expand([API_GROUP], [f"{POLICY_PLURAL}/status"], ["update", "patch"])
    | _expand([""], ["pods"], ["list", "watch"])
    | _expand([""], ["namespaces"], ["get", "list", "watch"])
    # Services: each Service port with HTTP rules behind it gets an Envoy listener.
    | _expand([""], ["services", "endpoints"], ["list", "watch"])
    | _expand(["discovery.k8s.io"], ["endpointslices"], ["list", "watch"])
    | EVENTS,
    "steer-node": _expand([""], ["pods"], ["get", "list", "watch"])
    | _expand([""], ["pods/status"], ["patch"])
    | _expand([""], ["namespaces"], ["get", "list", "watch"])
    | _expand([API_GROUP], [POLICY_PLURAL], ["list", "watch"])
    | _expand([""], ["services", "endpoints", "nodes"], ["list", "watch"])
    | _expand(["discovery.k8s.io"], ["endpointslices"], ["list", "watch"])
    | EVENTS,
}


@pytest.mark.parametrize("doc", [d for d in DOCS if "Role" in d.kind], ids=lambda d: d.id)
def test_rbac_has_no_wildcards(doc: Doc) -> None:
    for rule in doc.obj.get("rules", []):
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(key, []), f"{doc.id}: * in {key}"
        assert "nonResourceURLs" not in rule


@pytest.mark.parametrize("account", sorted(EXPECTED_GRANTS))
def test_rbac_grants_exactly_what_each_component_needs(account: str) -> None:
    assert grants(only("ClusterRole", account)) == EXPECTED_GRANTS[account]
    binding = only("ClusterRoleBinding", account)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": account,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": SYSTEM_NAMESPACE}
    ]
    only("ServiceAccount", account)


def test_workloads_use_their_own_service_accounts() -> None:
    assert (
        NODE_POD["serviceAccountName"] != CONTROL["spec"]["template"]["spec"]["serviceAccountName"]
    )
    # The one namespaced grant: the control plane's leader Lease.
    assert [(d.kind, d.name) for d in DOCS if d.kind in {"Role", "RoleBinding"}] == [
        ("Role", "steer-control-leader"),
        ("RoleBinding", "steer-control-leader"),
    ]


def test_control_plane_may_use_only_its_own_lease_in_its_namespace() -> None:
    role = only("Role", "steer-control-leader")
    assert role["metadata"]["namespace"] == SYSTEM_NAMESPACE
    # create cannot be limited by name (there is none yet); get and update are.
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [LEADER_LEASE_NAME],
            "verbs": ["get", "update"],
        },
    ]
    binding = only("RoleBinding", "steer-control-leader")
    assert binding["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "steer-control-leader",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "steer-control", "namespace": SYSTEM_NAMESPACE}
    ]


# --- webhooks -------------------------------------------------------------------------------


WEBHOOK_CONFIGS = [d for d in DOCS if d.kind.endswith("WebhookConfiguration")]
CA_ANNOTATION = {"cert-manager.io/inject-ca-from": f"{SYSTEM_NAMESPACE}/steer-webhook-tls"}


@pytest.mark.parametrize("doc", WEBHOOK_CONFIGS, ids=lambda d: d.id)
def test_webhooks_are_v1_side_effect_free_and_fail_closed(doc: Doc) -> None:
    assert doc.obj["metadata"]["annotations"] == CA_ANNOTATION
    for webhook in doc.obj["webhooks"]:
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["sideEffects"] == "None"
        # Creation fails closed; the updates of running pods fail open (the agent ignores
        # a weakening change anyway, and an outage must not stop controllers).
        updates_only = all(r["operations"] == ["UPDATE"] for r in webhook["rules"])
        assert webhook["failurePolicy"] == ("Ignore" if updates_only else "Fail")
        assert webhook["timeoutSeconds"] == 5
        service = webhook["clientConfig"]["service"]
        assert (service["name"], service["namespace"], service["port"]) == (
            CONTROL_SERVICE,
            SYSTEM_NAMESPACE,
            443,
        )
        assert "caBundle" not in webhook["clientConfig"], "the CA is injected, not committed"


def test_pod_webhook() -> None:
    """Opted-in namespaces, and single opted-in pods in namespaces that said nothing;
    namespaces that opted out (kube-system should, steer-system does) never reach it."""
    config = only("MutatingWebhookConfiguration", "steer-pods")
    by_namespace, by_pod, update_by_namespace, update_by_pod = config["webhooks"]
    for webhook, operation in (
        (by_namespace, "CREATE"),
        (by_pod, "CREATE"),
        (update_by_namespace, "UPDATE"),
        (update_by_pod, "UPDATE"),
    ):
        assert webhook["clientConfig"]["service"]["path"] == WEBHOOK_MUTATE_PODS_PATH
        assert webhook["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": [operation],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert webhook["reinvocationPolicy"] == "Never"
    for create, update in ((by_namespace, update_by_namespace), (by_pod, update_by_pod)):
        assert create["namespaceSelector"] == update["namespaceSelector"]
        assert create.get("objectSelector") == update.get("objectSelector")
    assert by_namespace["name"] == MUTATING_WEBHOOK_NAME
    assert by_namespace["namespaceSelector"] == {
        "matchExpressions": [{"key": ANNOTATION_INJECT, "operator": "In", "values": ["enabled"]}]
    }
    assert "objectSelector" not in by_namespace
    assert by_pod["namespaceSelector"] == {
        "matchExpressions": [{"key": ANNOTATION_INJECT, "operator": "DoesNotExist"}]
    }
    assert by_pod["objectSelector"] == {"matchLabels": {ANNOTATION_INJECT: "enabled"}}


def test_policy_webhook() -> None:
    config = only("ValidatingWebhookConfiguration", "steer-httppolicies")
    [webhook] = config["webhooks"]
    assert webhook["name"] == VALIDATING_WEBHOOK_NAME
    assert webhook["clientConfig"]["service"]["path"] == WEBHOOK_VALIDATE_POLICIES_PATH
    assert webhook["rules"] == [
        {
            "apiGroups": [API_GROUP],
            "apiVersions": [API_VERSION],
            "operations": ["CREATE", "UPDATE"],
            "resources": [POLICY_PLURAL],
            "scope": "Namespaced",
        }
    ]


def test_cert_manager_certificate_is_the_one_the_webhooks_name() -> None:
    directory = MANIFESTS / "cert-manager"
    kustomization = load_kustomization(directory)
    objs = [
        o
        for r in kustomization["resources"]
        for o in yaml.safe_load_all((directory / r).read_text())
    ]
    # The Certificate the webhooks' CA annotation names (the overlay has others for xDS).
    named = CA_ANNOTATION["cert-manager.io/inject-ca-from"].split("/")[1]
    [certificate] = [
        o for o in objs if o["kind"] == "Certificate" and o["metadata"]["name"] == named
    ]
    [issuer] = [o for o in objs if o["kind"] == "Issuer" and "selfSigned" in o["spec"]]
    namespace, name = CA_ANNOTATION["cert-manager.io/inject-ca-from"].split("/")
    assert (certificate["metadata"]["namespace"], certificate["metadata"]["name"]) == (
        namespace,
        name,
    )
    assert certificate["spec"]["secretName"] == "steer-webhook-tls"
    assert f"{CONTROL_SERVICE}.{SYSTEM_NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"] == {
        "kind": "Issuer",
        "name": issuer["metadata"]["name"],
    }


# --- the image ------------------------------------------------------------------------------


def test_dockerfile_builds_the_steer_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.MULTILINE)[-1] == "debian:bookworm-slim"
    assert 'ENTRYPOINT ["steer"]' in text
    for package in ("python3-bpfcc", "libbpf1", "iptables", "conntrack", "iproute2", "bpftool"):
        assert re.search(rf"\b{package}\b", text), package
    assert "--system-site-packages" in text
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored


def test_cert_manager_issues_the_xds_server_certificate_from_steers_ca() -> None:
    directory = MANIFESTS / "cert-manager"
    objs = {
        (o["kind"], o["metadata"]["name"]): o
        for r in load_kustomization(directory)["resources"]
        for o in yaml.safe_load_all((directory / r).read_text())
    }
    ca = objs[("Certificate", "steer-ca")]["spec"]
    assert ca["isCA"] is True
    ca_issuer = objs[("Issuer", "steer-ca")]["spec"]
    assert ca_issuer == {"ca": {"secretName": ca["secretName"]}}
    xds = objs[("Certificate", "steer-xds-tls")]["spec"]
    # The Secret steer-control mounts, for the name the nodes' Envoys dial.
    assert xds["secretName"] == "steer-xds-tls"
    assert f"{CONTROL_SERVICE}.{SYSTEM_NAMESPACE}.svc" in xds["dnsNames"]
    assert "server auth" in xds["usages"]
    assert xds["issuerRef"] == {"kind": "Issuer", "name": "steer-ca"}
