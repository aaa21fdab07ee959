"""The sample policies and a three-pod node, shared by unit and golden tests."""

from __future__ import annotations

from importlib import resources

from steer.model.enforce import Enforcement, resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy

CLIENT = Pod("client", "default", "10.244.0.2", {"app": "client"}, interface="spaaaaaaaa")
WEB = Pod("web", "default", "10.244.0.3", {"app": "web"}, interface="spbbbbbbbb")
API = Pod("api", "default", "10.244.0.4", {"app": "api"}, interface="spcccccccc")
PODS = (CLIENT, WEB, API)


def sample_policies() -> list[HTTPPolicy]:
    policies: list[HTTPPolicy] = []
    for entry in sorted(resources.files("steer.samples").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            loaded, errors = parse_policies(entry.read_text(), entry.name)
            assert not errors, errors
            policies += loaded
    return policies


def sample_enforcement(pods: tuple[Pod, ...] = PODS) -> Enforcement:
    return resolve(sample_policies(), pods)


def policy_yaml(spec: str, name: str = "p", namespace: str = "default") -> str:
    return (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n" + spec
    )


def tenant_client_policies(web_ip: str) -> list[HTTPPolicy]:
    """The client moved to namespace `tenant`, whose egress policy puts HTTP rules on its
    traffic to web:8080: a destination's inbound exclusion must not switch them off."""
    spec = (
        "spec:\n  podSelector:\n    matchLabels: {app: client}\n  egress:\n"
        "    defaultAction: Allow\n    rules:\n      - name: no-admin\n        action: Deny\n"
        f"        to: [{{cidr: {web_ip}/32}}]\n        ports: [{{port: 8080}}]\n"
        "        http:\n          paths: [{prefix: /admin}]\n"
    )
    policies, errors = parse_policies(policy_yaml(spec, "client-egress", "tenant"), "t.yaml")
    assert not errors, errors
    return policies
