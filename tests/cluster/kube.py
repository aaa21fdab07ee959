"""A real one-node cluster (scripts/kube-node.sh) with steer installed the way
docs/install-kubernetes.md tells users to: the image, `steer certs`, `kubectl apply -k`, the
Secrets, the webhooks' caBundle, each node's xDS certificate.

Everything waits by polling against a deadline (`eventually`), never by a fixed sleep, so
the tests hold on a loaded 2-core machine.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests import waiting

REPO = Path(__file__).parents[2]
KUBE_NODE = REPO / "scripts" / "kube-node.sh"
STEER_IMAGE = REPO / "scripts" / "steer-image.sh"
KUSTOMIZE = Path(__file__).parent / "kustomize"
OVERLAY = KUSTOMIZE / "kube-node"
CLEANUP_OVERLAY = KUSTOMIZE / "kube-node-cleanup"
KUBE_CACHE = Path(os.environ.get("STEER_KUBE_CACHE", "/var/cache/steer/kube")) / "v1.20.2"
# kubectl 1.20, the apiserver's own version, with the kustomize (2.0.3) users of 1.20 have.
KUBECTL = KUBE_CACHE / "node-root" / "usr" / "bin" / "kubectl"
STEER = Path(sys.executable).parent / "steer"

NODE_NAME = "steer-kube-node"
NODE_IP = "10.87.0.2"
SYSTEM = "steer-system"
WORKLOAD_IMAGE = "steer-kube.local/busybox:1.35"
GATE = "steer.dev/steered"
# The node's cgroup v2 subtree (kubelet's --cgroup-root, in this hybrid host's unified
# hierarchy): pods are in kubepods/<qos>/pod<uid>/<container id> below it.
NODE_CGROUP = Path("/sys/fs/cgroup/unified/steer-kube")

T = TypeVar("T")


def eventually(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """tests.waiting.eventually, where a failed command, a missing file or unparsable
    output count as not yet."""
    return waiting.eventually(
        check,
        what,
        timeout,
        interval=0.1,
        max_interval=1.0,
        not_yet=(AssertionError, subprocess.CalledProcessError, OSError, ValueError),
    )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=None if env is None else {**os.environ, **env},
        check=False,
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode, proc.args, output=proc.stdout, stderr=proc.stderr
        )
    return proc


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass
class HttpResult:
    status: int | None  # None: no HTTP answer
    error: str  # what the client said when there was none

    @property
    def refused(self) -> bool:
        return self.status is None and (
            "refused" in self.error.lower() or "reset" in self.error.lower()
        )


@dataclass
class Cluster:
    kubeconfig: Path
    tmp: Path
    installed: bool = False
    namespaces: list[str] = field(default_factory=list)

    # --- processes -------------------------------------------------------------------------

    def kubectl(
        self, *args: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [KUBECTL, "--kubeconfig", self.kubeconfig, *args],
            timeout=timeout,
            check=check,
            input=input,
        )

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def node(self, *argv: str | os.PathLike[str], check: bool = True, timeout: float = 30) -> str:
        """A command inside the node's network and mount namespaces."""
        return run([KUBE_NODE, "exec", "--", *argv], check=check, timeout=timeout).stdout

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", input=manifest)

    # --- steer's installation ---------------------------------------------------------------

    def install(self) -> None:
        """As docs/install-kubernetes.md says, with the kube-node overlay's image (which
        `kube_node` had imported into the node's containerd while it came up)."""
        pki = self.tmp / "pki"
        if not (pki / "ca.crt").exists():
            run([STEER, "certs", "--out", pki, "--node", NODE_NAME])
        node_pki = pki / "nodes" / NODE_NAME
        self.node("install", "-d", "-m", "0755", "/etc/steer/xds-node")
        self.node("install", "-m", "0644", node_pki / "tls.crt", node_pki / "ca.crt",
                  "/etc/steer/xds-node/")  # fmt: skip
        self.node("install", "-m", "0600", node_pki / "tls.key", "/etc/steer/xds-node/")
        self.kubectl("apply", "-k", str(OVERLAY), timeout=120)
        secrets = [
            ["create", "secret", "tls", "steer-webhook-tls",
             f"--cert={pki / 'tls.crt'}", f"--key={pki / 'tls.key'}"],
            ["create", "secret", "generic", "steer-xds-tls",
             f"--from-file=tls.crt={pki / 'xds.crt'}", f"--from-file=tls.key={pki / 'xds.key'}",
             f"--from-file=ca.crt={pki / 'ca.crt'}"],
        ]  # fmt: skip
        for secret in secrets:
            manifest = self.kubectl("-n", SYSTEM, *secret, "--dry-run=client", "-o", "yaml").stdout
            self.apply(manifest)
        ca = base64.b64encode((pki / "ca.crt").read_bytes()).decode()

        def patch(count: int) -> str:
            return json.dumps(
                [
                    {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca}
                    for i in range(count)
                ]
            )

        self.kubectl("patch", "mutatingwebhookconfiguration/steer-pods", "--type=json",
                     "-p", patch(4))  # fmt: skip
        self.kubectl("patch", "validatingwebhookconfiguration/steer-httppolicies",
                     "--type=json", "-p", patch(1))  # fmt: skip
        self.kubectl("-n", SYSTEM, "rollout", "status", "deployment/steer-control",
                     "--timeout=300s", timeout=330)  # fmt: skip
        self.kubectl("-n", SYSTEM, "rollout", "status", "daemonset/steer-node",
                     "--timeout=300s", timeout=330)  # fmt: skip
        self.installed = True

    def node_pod(self) -> str:
        pods = self.get("-n", SYSTEM, "pods", "-l", "app.kubernetes.io/component=node")
        names = [p["metadata"]["name"] for p in pods["items"]]
        assert len(names) == 1, f"expected one steer-node pod, found {names}"
        return str(names[0])

    def agent_status(self) -> dict[str, Any]:
        """`steer status --json`'s agent document, read on the node."""
        loaded: dict[str, Any] = json.loads(self.node("cat", "/run/steer/agent-status.json"))
        return loaded

    def envoy_routes(self) -> set[str]:
        out = self.kubectl(
            "-n", SYSTEM, "exec", self.node_pod(), "-c", "envoy", "--", "python3", "-c",
            "from steer.node.kubeagent import envoy_route_names as r; print(*sorted(r()))",
        ).stdout  # fmt: skip
        return set(out.split())

    # --- workloads --------------------------------------------------------------------------

    def namespace(self, *, inject: bool = True) -> str:
        name = unique("steer-kube-t")
        labels = {"steer.dev/inject": "enabled"} if inject else {}
        self.apply(
            json.dumps(
                {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": name, "labels": labels}}
            )
        )  # fmt: skip
        # Pods are refused until the controller-manager has made the service account.
        eventually(
            lambda: (
                self.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode
                == 0
            ),
            f"the default service account of {name}",
        )
        self.namespaces.append(name)
        return name

    def pod(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        *,
        script: str = "exec sleep 3600",
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        self.apply(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": dict(labels),
                        "annotations": dict(annotations or {}),
                    },
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        # No API access needed, and no token volume to set up and tear
                        # down: kubelet 1.20 deletes a pod's object only once its volumes
                        # are gone, often a 10 s status sync later.
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "main",
                                "image": WORKLOAD_IMAGE,
                                "imagePullPolicy": "Never",
                                # As PID 1 the script ignores SIGTERM, so a delete waits
                                # out kubelet's minimum grace (2 s). Deliberately: a
                                # container that exits at once races kubelet 1.20's
                                # container GC, whose failed kill then holds the pod's
                                # deletion for 10 to 60 s.
                                "command": ["sh", "-c", script],
                            }
                        ],
                    },
                }
            )
        )

    def web_pod(self, namespace: str, name: str = "web", **kwargs: Any) -> None:
        """busybox httpd on 8080 (/public/, which answers the pod's name, and /admin/) and
        on 9090."""
        script = (
            f"mkdir -p /www/public /www/admin && echo {name} >/www/public/index.html"
            " && echo admin >/www/admin/index.html && httpd -p 9090 -h /www"
            " && exec httpd -f -p 8080 -h /www"
        )
        self.pod(namespace, name, {"app": "web"}, script=script, **kwargs)

    def wait_ready(self, namespace: str, *names: str, timeout: float = 120) -> None:
        for name in names:
            self.kubectl("-n", namespace, "wait", "--for=condition=Ready", f"pod/{name}",
                         f"--timeout={int(timeout)}s", timeout=timeout + 30)  # fmt: skip

    def pod_ip(self, namespace: str, name: str) -> str:
        return str(
            eventually(
                lambda: self.get("-n", namespace, "pod", name)["status"].get("podIP"),
                f"{namespace}/{name}'s IP",
            )
        )

    def http(self, namespace: str, pod: str, url: str) -> HttpResult:
        """One GET from inside the pod (its cgroup and netns: what steer steers), with
        busybox wget; bounded by `timeout`, as busybox's own -T crashes."""
        out = self.kubectl(
            "-n", namespace, "exec", pod, "--", "sh", "-c",
            f"timeout 5 wget -S -O /dev/null {shlex.quote(url)} 2>&1; true",
            timeout=30,
        ).stdout  # fmt: skip
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].startswith("HTTP/") and words[1].isdigit():
                return HttpResult(int(words[1]), "")
        return HttpResult(None, out.strip())

    def delete_namespaces(self) -> None:
        for name in self.namespaces:
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)
        self.namespaces.clear()


@contextmanager
def kube_node() -> Iterator[Path]:
    """Builds (cached) and starts the node, with steer's image imported as it comes up;
    always takes it down again."""
    run([KUBE_NODE, "build"], timeout=3600)
    image = run([STEER_IMAGE, "build"], timeout=3600).stdout.strip().splitlines()[-1]
    try:
        out = run([KUBE_NODE, "up", image], timeout=600).stdout
        yield Path(out.strip().splitlines()[-1])
    finally:
        run([KUBE_NODE, "down"], timeout=300, check=False)


def pod_entry(status: Mapping[str, Any], namespace: str, name: str) -> dict[str, Any] | None:
    """The agent status document's entry for one pod, if the agent lists it."""
    for entry in status.get("pods", []):
        if entry["namespace"] == namespace and entry["name"] == name:
            return dict(entry)
    return None


def condition(pod: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for entry in pod.get("status", {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return None


def container_cgroup(pod: Mapping[str, Any], container: str) -> Path:
    """A running container's cgroup v2 directory on the node, found from the pod's UID and
    the container's ID as runc lays it out there (not with steer's resolver)."""
    [status] = [s for s in pod["status"]["containerStatuses"] if s["name"] == container]
    container_id = status["containerID"].removeprefix("containerd://")
    uid = pod["metadata"]["uid"]
    found = list(NODE_CGROUP.glob(f"kubepods/*/pod{uid}/{container_id}")) + list(
        NODE_CGROUP.glob(f"kubepods/pod{uid}/{container_id}")
    )
    assert len(found) == 1, f"cgroup of {container} ({container_id}) in pod {uid}: {found}"
    return found[0]


def pod_cgroup_dir(uid: str) -> Path | None:
    """The pod's cgroup v2 directory on the node, if it exists (runc's layout)."""
    found = list(NODE_CGROUP.glob(f"kubepods/*/pod{uid}")) + list(
        NODE_CGROUP.glob(f"kubepods/pod{uid}")
    )
    return found[0] if found else None


def attached_programs(cgroup: Path) -> set[str]:
    """The names of the BPF programs attached to the cgroup itself, as the kernel says."""
    out = run(["bpftool", "-j", "cgroup", "show", cgroup]).stdout
    return {str(entry["name"]) for entry in json.loads(out.strip() or "[]")}


def _map_key(key: Any) -> int:
    # With BTF bpftool prints the key as a number; without it, as little-endian hex bytes.
    return key if isinstance(key, int) else int.from_bytes(bytes(int(b, 16) for b in key), "little")


def steered_cgroup_ids(cluster: Cluster) -> set[int]:
    """The cgroup ids in steer_pods (the pods connect4 steers), read from the node's pins;
    none before the agent first loads the eBPF datapath."""
    pin = "/sys/fs/bpf/steer/steer_pods"
    out = cluster.node(
        "sh", "-c", f"if [ -e {pin} ]; then exec bpftool -j map dump pinned {pin}; else echo []; fi"
    )
    return {_map_key(entry["key"]) for entry in json.loads(out)}


def node_envoy_pids() -> list[int]:
    """The node's Envoy processes: comm `envoy`, in the node's cgroup subtree only (the
    machine may run other Envoys, which are none of these tests' business)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "envoy":
                continue
            cgroups = (proc / "cgroup").read_text()
        except OSError:
            continue
        if any(line.startswith("0::/steer-kube/") for line in cgroups.splitlines()):
            pids.append(int(proc.name))
    return pids
