"""The incremental pipeline (Resolver, SnapshotRenderer, RulesetCache, BpfPolicyCache,
snapshot encodings and ruleset digests carried over) must always equal a fresh render of
the same input.

A seeded random walk of changes, each one of the kinds a cluster produces (a policy edited,
added or removed, a pod relabelled, re-addressed, opted out, added or removed, and inputs
rebuilt as equal but new objects), checks that after every step.
"""

from __future__ import annotations

import gc
import json
import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from steer.control.cache import Snapshot
from steer.model.enforce import Enforcement, ManagedPod, Resolver, resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.node.datapath import NodeDatapath
from steer.node.fakekernel import RecordingKernel
from steer.node.features import Features
from steer.render.bpf import BpfPolicyCache, PodPolicy, TooComplexForBpf, render_pod_policy
from steer.render.iptables import RulesetCache, render_ruleset
from steer.render.xds import SnapshotRenderer, render_resources
from steer.source.local import LabPods, parse_lab_state

NAMESPACES = ("a", "b")
APPS = ("x", "y", "z")


# CIDRs over the pods' own addresses, nested and overlapping, so host prefixes come and go
# inside them (the eBPF render's hardest incremental case), and one beside them.
CIDRS = ("10.244.0.0/24", "10.244.0.0/28", "10.244.0.2/31", "10.244.0.5/32", "172.16.1.0/24")


def random_annotations(rng: random.Random) -> dict[str, str]:
    annotations = {"steer.dev/inject": "disabled"} if rng.random() < 0.15 else {}
    if rng.random() < 0.15:
        annotations["steer.dev/exclude-inbound-ports"] = str(rng.choice((80, 8080)))
    if rng.random() < 0.1:
        annotations["steer.dev/exclude-outbound-cidrs"] = rng.choice(CIDRS)
    return annotations


def random_pod(rng: random.Random, index: int) -> Pod:
    annotations = random_annotations(rng)
    return Pod(
        f"p{index}",
        rng.choice(NAMESPACES),
        f"10.244.{index // 200}.{index % 200 + 2}",
        {"app": rng.choice(APPS), "tier": rng.choice(("1", "2"))},
        annotations=annotations,
    )


def random_rule(rng: random.Random, direction: str) -> str:
    peer_key = "from" if direction == "ingress" else "to"
    if rng.random() < 0.5:
        peer = f"{{podSelector: {{matchLabels: {{app: {rng.choice(APPS)}}}}}}}"
    else:
        peer = f"{{cidr: {rng.choice(CIDRS)}}}"
    lines = [
        f"      - action: {rng.choice(('Allow', 'Deny'))}",
        f"        {peer_key}: [{peer}]",
        f"        ports: [{{port: {rng.choice((80, 443, 8080))}}}]",
    ]
    if rng.random() < 0.4:
        lines.append(f"        http: {{paths: [{{prefix: /p{rng.randrange(5)}/}}]}}")
    return "\n".join(lines)


def random_policy(rng: random.Random, name: str) -> HTTPPolicy:
    sections = []
    for direction in ("ingress", "egress"):
        if rng.random() < 0.6:
            rules = "\n".join(random_rule(rng, direction) for _ in range(rng.randrange(1, 4)))
            sections.append(
                f"  {direction}:\n    defaultAction: {rng.choice(('Allow', 'Deny'))}\n"
                f"    rules:\n{rules}"
            )
    if not sections:
        sections.append("  ingress:\n    defaultAction: Deny\n    rules: []")
    text = (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: {name}, namespace: {rng.choice(NAMESPACES)}}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: {rng.choice(APPS)}}}}}\n"
        + "\n".join(sections)
        + "\n"
    )
    policies, errors = parse_policies(text, name)
    assert not errors, errors
    return policies[0]


def mutate(
    rng: random.Random, policies: dict[str, HTTPPolicy], pods: dict[str, Pod], counter: list[int]
) -> str:
    kind = rng.choice(
        (
            "edit-policy",
            "add-policy",
            "remove-policy",
            "relabel-pod",
            "readdress-pod",
            "opt-out-pod",
            "annotate-pod",
            "add-pod",
            "remove-pod",
            "rebuild-equal",
        )
    )
    counter[0] += 1
    if kind == "edit-policy" and policies:
        name = rng.choice(sorted(policies))
        policies[name] = random_policy(rng, name)
    elif kind == "add-policy" or not policies:
        name = f"pol{counter[0]}"
        policies[name] = random_policy(rng, name)
    elif kind == "remove-policy":
        del policies[rng.choice(sorted(policies))]
    elif kind == "add-pod" or not pods:
        pod = random_pod(rng, counter[0])
        pods[pod.key] = pod
    elif kind == "remove-pod":
        del pods[rng.choice(sorted(pods))]
    else:
        key = rng.choice(sorted(pods))
        pod = pods[key]
        if kind == "relabel-pod":
            pods[key] = replace(pod, labels={**pod.labels, "app": rng.choice(APPS)})
        elif kind == "readdress-pod":
            taken = {p.ip for p in pods.values()}
            free = [f"10.244.0.{i}" for i in range(2, 16) if f"10.244.0.{i}" not in taken]
            far = f"10.245.{counter[0] // 200}.{counter[0] % 200 + 2}"
            pods[key] = replace(pod, ip=rng.choice(free) if free and rng.random() < 0.5 else far)
        elif kind == "opt-out-pod":
            inject = "enabled" if pod.annotations.get("steer.dev/inject") else "disabled"
            pods[key] = replace(pod, annotations={"steer.dev/inject": inject})
        elif kind == "annotate-pod":
            pods[key] = replace(pod, annotations=random_annotations(rng))
        else:  # equal content, new objects: a reflector relist, a reparsed file
            pods.update({k: replace(p) for k, p in pods.items()})
            policies.update({k: p.model_copy(deep=True) for k, p in policies.items()})
    return kind


def _pod_policy(
    enforcement: Enforcement, pod: ManagedPod, cache: BpfPolicyCache | None
) -> PodPolicy | str:
    try:
        return render_pod_policy(enforcement, pod, cache=cache)
    except TooComplexForBpf as exc:
        return str(exc)


@pytest.mark.parametrize("seed", range(6))
def test_every_step_equals_a_fresh_render(seed: int) -> None:
    rng = random.Random(seed)
    pods = {p.key: p for p in (random_pod(rng, i) for i in range(12))}
    policies = {f"pol{i}": random_policy(rng, f"pol{i}") for i in range(5)}
    resolver, renderer, chains = Resolver(), SnapshotRenderer(), RulesetCache()
    maps = BpfPolicyCache()
    previous_snapshot, previous_ruleset = None, None
    counter = [100]
    for step in range(60):
        kind = mutate(rng, policies, pods, counter)
        policy_list, pod_list = list(policies.values()), list(pods.values())
        fresh = resolve(policy_list, pod_list)
        where = f"seed {seed}, step {step} ({kind})"

        assert resolver.resolve(policy_list, pod_list) == fresh, where

        enforcement, resources = renderer.render(policy_list, pod_list)
        assert enforcement == fresh, where
        assert resources == render_resources(fresh), where

        ruleset = render_ruleset(enforcement, cache=chains)
        assert ruleset == render_ruleset(fresh), where
        assert ruleset.digest(previous_ruleset) == render_ruleset(fresh).digest(), where

        # As on a node, only some pods are on eBPF, and they change datapath over time.
        for pod in (p for p in enforcement.pods if rng.random() < 0.8):
            assert _pod_policy(enforcement, pod, maps) == _pod_policy(fresh, pod, None), where
        maps.forget_unused()

        snapshot = Snapshot(resources)
        if previous_snapshot is not None:
            snapshot.reuse_encodings(previous_snapshot)
        afresh = Snapshot(render_resources(fresh))
        for type_url in afresh.resources:
            assert snapshot.version(type_url) == afresh.version(type_url), where
            assert snapshot.resource_versions(type_url) == afresh.resource_versions(type_url)
        previous_snapshot, previous_ruleset = snapshot, ruleset


def _policy(name: str, selected: str, peer: str, port: int = 80) -> HTTPPolicy:
    text = (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: {name}, namespace: a}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: {selected}}}}}\n"
        "  ingress:\n    rules:\n"
        f"      - from: [{{podSelector: {{matchLabels: {{app: {peer}}}}}}}]\n"
        f"        ports: [{{port: {port}}}]\n"
    )
    policies, errors = parse_policies(text, name)
    assert not errors, errors
    return policies[0]


PODS = [
    Pod("web", "a", "10.244.0.2", {"app": "web"}),
    Pod("db", "a", "10.244.0.3", {"app": "db"}),
    Pod("client", "a", "10.244.0.4", {"app": "client"}),
]
WEB, DB = IPv4Address("10.244.0.2"), IPv4Address("10.244.0.3")


def test_a_policy_edit_keeps_every_other_side_the_same_object() -> None:
    """What lets the renderers cache by identity."""
    resolver = Resolver()
    before = resolver.resolve([_policy("web", "web", "client"), _policy("db", "db", "web")], PODS)
    edited = [_policy("web", "web", "client", port=8080), _policy("db", "db", "web")]
    after = resolver.resolve(edited, PODS)
    assert after == resolve(edited, PODS)
    assert after.ingress[WEB] is not before.ingress[WEB]
    assert after.ingress[DB] is before.ingress[DB]


def test_a_pod_change_re_resolves_only_the_policies_that_name_it() -> None:
    policies = [_policy("web", "web", "client"), _policy("db", "db", "web")]
    resolver = Resolver()
    before = resolver.resolve(policies, PODS)
    # The client moves: web's policy names it as a peer, db's policy does not.
    moved = [*PODS[:2], replace(PODS[2], ip="10.244.0.9")]
    after = resolver.resolve(policies, moved)
    assert after == resolve(policies, moved)
    assert after.ingress[WEB].rules[0].peers == (IPv4Network("10.244.0.9/32"),)
    assert after.ingress[DB] is before.ingress[DB]


def test_a_lab_state_rewritten_for_one_pod_keeps_the_other_pods_objects() -> None:
    """What lets the resolver skip the pods a lab change did not touch."""
    entries = [
        {"name": f"p{i}", "namespace": "a", "ip": f"10.244.0.{i + 2}", "labels": {"app": "x"}}
        for i in range(3)
    ]
    parser = LabPods()
    before, _ = parser.parse(json.dumps({"pods": entries}))
    entries[1]["labels"] = {"app": "y"}
    after, _ = parser.parse(json.dumps({"pods": entries}))
    assert after == parse_lab_state(json.dumps({"pods": entries}))[0]
    assert after[0] is before[0] and after[2] is before[2]
    assert after[1] is not before[1] and after[1].labels == {"app": "y"}


def test_relabelling_every_pod_leaves_no_object_behind_per_change(tmp_path: Path) -> None:
    """Memory stays flat under pod churn: the agent's whole sync, from the lab state's text
    to the kernel calls, keeps no object per change (a changed pod's steering and address
    used to stay behind beside the new ones, a slope in the churn benchmark)."""
    policies = [_policy("web", "web", "client"), _policy("db", "db", "web")]
    entries = [
        {"name": f"p{i}", "namespace": "a", "ip": f"10.244.1.{i + 2}", "labels": {"app": "x"}}
        for i in range(60)
    ]
    parser = LabPods()
    datapath = NodeDatapath(
        kernel=RecordingKernel(),
        features=Features(ebpf=True, skmsg=True, ebpf_reason="", skmsg_reason=""),
        bpf_state_file=tmp_path / "bpf.json",
    )

    def relabel_each(app: str) -> int:
        for entry in entries:
            entry["labels"] = {"app": app}
            pods, _ = parser.parse(json.dumps({"pods": entries}))
            datapath.sync(policies, pods)
            datapath.kernel.calls.clear()
        gc.collect()
        return len(gc.get_objects())

    # Warm-up: the caches fill once for every arrangement the pods will take. After it, the
    # same arrangement holds the same objects, give or take the test runner's own few
    # (a leak of one object per change would add 60 a round).
    apps = ["web", "db", "client"]
    for app in apps * 2:
        relabel_each(app)
    held = {app: relabel_each(app) for app in apps}
    again = {app: relabel_each(app) for app in apps}
    assert all(again[app] <= held[app] + 20 for app in apps), (held, again)
