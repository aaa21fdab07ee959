"""`steer bench`: measured figures, never asserted in tests.

Scenario `render`: how long it takes to render a node's xDS snapshot (the control plane:
resolve, xDS resources, encoding and versions) and its iptables ruleset (the agent), and
to apply the ruleset to a kernel, at growing rule counts. Each is measured cold (as after
a start) and after one policy is removed, rendering the way the running processes do:
through their incremental caches. The apply runs in a scratch network namespace of its
own, so it never touches the host's rules or a running lab.
"""

from __future__ import annotations

import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from steer.bench import BenchOptions
from steer.bench.plots import new_figure, save
from steer.bench.stats import abba
from steer.control.cache import Snapshot
from steer.idlegc import IdleCollector
from steer.model.enforce import Resolver
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.node.datapath import apply_ruleset
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns
from steer.render.iptables import RulesetCache, render_ruleset
from steer.render.xds import LISTENER_TYPE, SnapshotRenderer

T = TypeVar("T")
RULES_PER_POLICY = 50
# At the largest size (10k rules over 1k pods): a snapshot render after one change, and
# the first apply of the ruleset.
TARGET_RENDER_MS = 100.0
TARGET_APPLY_S = 0.3
FIRST_POD_IP = IPv4Address("10.100.0.1")


def synthetic_node(rules: int, pods: int = 100) -> tuple[list[HTTPPolicy], list[Pod]]:
    """`rules` L4 and HTTP rules spread over policies on `pods` pods."""
    pod_list = [
        Pod(
            f"p{i}",
            "bench",
            str(FIRST_POD_IP + i),
            {"app": f"a{i}"},
            interface=f"spb{i:07d}",
        )
        for i in range(pods)
    ]
    documents = []
    for index in range(max(1, rules // RULES_PER_POLICY)):
        rule_lines = []
        for r in range(RULES_PER_POLICY):
            n = index * RULES_PER_POLICY + r
            http = f"\n        http: {{paths: [{{prefix: /r{n}/}}]}}" if n % 2 else ""
            rule_lines.append(
                f"      - from: [{{cidr: 172.{16 + n // 65536 % 16}.{n // 256 % 256}.0/24}}]\n"
                f"        ports: [{{port: {1024 + n % 60000}}}]{http}"
            )
        documents.append(
            "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
            f"metadata: {{name: bench-{index}, namespace: bench}}\n"
            f"spec:\n  podSelector: {{matchLabels: {{app: a{index % pods}}}}}\n"
            "  ingress:\n    defaultAction: Deny\n    rules:\n" + "\n".join(rule_lines)
        )
    policies, errors = parse_policies("\n---\n".join(documents), "bench")
    if errors:
        raise ValueError(errors)
    return policies, pod_list


@contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"steer-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def _clear_render_caches() -> None:
    from steer.model import enforce
    from steer.render import xds

    enforce._network.cache_clear()
    xds._host.cache_clear()
    xds._cidr.cache_clear()


def _snapshot(
    renderer: SnapshotRenderer,
    policies: list[HTTPPolicy],
    pods: list[Pod],
    previous: Snapshot | None = None,
) -> Snapshot:
    """What the control plane does per change: render, then encode and version what a
    push needs (reusing the encodings of unchanged resources, as its cache does)."""
    _, resources = renderer.render(policies, pods)
    snapshot = Snapshot(resources)
    if previous is not None:
        snapshot.reuse_encodings(previous)
    snapshot.version(LISTENER_TYPE)
    return snapshot


def _timed_change(collector: IdleCollector, fn: Callable[[], T]) -> tuple[T, float]:
    """`fn` timed the way the processes run it: as one change, with automatic garbage
    collection held off until it is over (steer.idlegc)."""
    with collector.change():
        started = time.perf_counter()
        result = fn()
        took = (time.perf_counter() - started) * 1000
    return result, took


def _render_round(policies: list[HTTPPolicy], pods: list[Pod]) -> dict[str, float]:
    """One round at one size, rendering as the control plane and the agent do: a cold
    render (empty caches, as after a start), then the render after one policy is removed
    (what a live change pays, with what the first render left behind), then the applies
    in a fresh netns."""
    _clear_render_caches()
    collector = IdleCollector(idle_s=0.0)
    renderer = SnapshotRenderer()
    before, cold = _timed_change(collector, lambda: _snapshot(renderer, policies, pods))
    # One policy fewer: the kind of small change a live update must handle cheaply.
    _, warm = _timed_change(
        collector, lambda: _snapshot(renderer, policies[:-1], pods, previous=before)
    )
    resolver, chains = Resolver(), RulesetCache()
    ruleset, iptables_cold = _timed_change(
        collector, lambda: render_ruleset(resolver.resolve(policies, pods), cache=chains)
    )
    smaller, iptables_warm = _timed_change(
        collector, lambda: render_ruleset(resolver.resolve(policies[:-1], pods), cache=chains)
    )
    collector.tick()  # idle from here: collect what the round left, as the processes would
    figures = {
        "cold_ms": cold,
        "render_ms": warm,
        "iptables_cold_ms": iptables_cold,
        "iptables_render_ms": iptables_warm,
        "iptables_rules": float(len(ruleset.rules)),
    }
    with scratch_netns() as netns:
        figures["apply_s"] = run_in_netns(
            netns, lambda: _timed(lambda: apply_ruleset(HostKernel(), ruleset))
        )
        figures["reapply_s"] = run_in_netns(
            netns, lambda: _timed(lambda: apply_ruleset(HostKernel(), smaller, ruleset))
        )
    figures["apply_s"] /= 1000
    figures["reapply_s"] /= 1000
    return figures


FIGURES = (
    "render_ms",
    "cold_ms",
    "iptables_render_ms",
    "iptables_cold_ms",
    "apply_s",
    "reapply_s",
)


def run(options: BenchOptions) -> dict[str, Any]:
    """Snapshot render (resolve + xDS + encoding), ruleset render and apply times at 100,
    1k and 10k rules over 1k pods (quick: 10 and 100 rules over 50 pods)."""
    sizes, pods_count = ((10, 100), 50) if options.quick else ((100, 1000, 10000), 1000)
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    nodes = {size: synthetic_node(size, pods=pods_count) for size in sizes}
    # Sizes interleave round by round, so drift on a busy machine hits every size alike.
    for index, size in enumerate(abba(sizes, options.rounds), 1):
        options.progress(f"[{index}/{len(sizes) * options.rounds}] {size} rules")
        runs[size].append(_render_round(*nodes[size]))
    result: dict[str, Any] = {"scenario": "render", "pods": pods_count, "rounds": options.rounds}
    for figure in FIGURES:
        result[figure] = {str(n): statistics.median(r[figure] for r in runs[n]) for n in sizes}
        result[f"{figure}_min"] = {str(n): min(r[figure] for r in runs[n]) for n in sizes}
        result[f"{figure}_max"] = {str(n): max(r[figure] for r in runs[n]) for n in sizes}
    result["iptables_rules"] = {str(n): int(runs[n][0]["iptables_rules"]) for n in sizes}
    largest = str(max(sizes))
    result["targets"] = {
        f"render_ms {largest} <= {TARGET_RENDER_MS:.0f}": result["render_ms"][largest]
        <= TARGET_RENDER_MS,
        f"apply_s {largest} <= {TARGET_APPLY_S}": result["apply_s"][largest] <= TARGET_APPLY_S,
    }
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'rules':>6} {'snapshot: change':>17} {'cold':>9} {'ruleset: change':>16} {'cold':>9}"
        f" {'iptables rules':>15} {'apply':>8} {'re-apply':>9}"
    ]
    for size in result["render_ms"]:
        lines.append(
            f"{size:>6} {result['render_ms'][size]:>14.1f} ms {result['cold_ms'][size]:>6.0f} ms"
            f" {result['iptables_render_ms'][size]:>13.1f} ms"
            f" {result['iptables_cold_ms'][size]:>6.0f} ms {result['iptables_rules'][size]:>15}"
            f" {result['apply_s'][size]:>6.3f} s {result['reapply_s'][size]:>7.3f} s"
        )
    lines.append(f"({result['pods']} pods, {result['rounds']} rounds, medians)")
    lines += [
        f"target {name}: {'met' if met else 'NOT met'}"
        for name, met in result.get("targets", {}).items()
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    sizes = [int(s) for s in result["render_ms"]]
    figure, (left, right) = new_figure(2)
    for key, label in (
        ("render_ms", "snapshot, after one change"),
        ("cold_ms", "snapshot, cold"),
        ("iptables_render_ms", "ruleset, after one change"),
        ("iptables_cold_ms", "ruleset, cold"),
    ):
        left.plot(sizes, [result[key][str(s)] for s in sizes], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="rules", ylabel="ms", title="render")
    left.legend()
    for key, label in (("apply_s", "apply"), ("reapply_s", "re-apply, one change")):
        right.plot(sizes, [result[key][str(s)] for s in sizes], marker="o", label=label)
    right.set(xscale="log", xlabel="rules", ylabel="s", title="iptables apply")
    right.legend()
    save(figure, path)
