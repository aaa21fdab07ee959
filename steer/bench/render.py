"""`steer bench`: measured figures, never asserted in tests.

Scenario `render`: how long it takes to render the iptables ruleset and the xDS snapshot,
and to apply the ruleset to a kernel, at growing rule counts. The apply runs in a scratch
network namespace of its own, so it never touches the host's rules or a running lab.
"""

from __future__ import annotations

import statistics
import subprocess
import time
import uuid
from ipaddress import IPv4Address
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from steer.model.enforce import resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.node import iptables
from steer.node.netns import run_in_netns
from steer.render.iptables import render_ruleset
from steer.render.xds import render_resources

RULES_PER_POLICY = 50
FIRST_POD_IP = IPv4Address("10.100.0.1")


@dataclass(frozen=True)
class RenderRow:
    rules: int
    iptables_rules: int
    render_iptables_ms: float
    render_xds_ms: float
    apply_ms: float
    reapply_one_change_ms: float
    rounds: int


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


def _render_round(policies: list[HTTPPolicy], pods: list[Pod]) -> dict[str, float]:
    enforcement = resolve(policies, pods)
    ruleset = render_ruleset(enforcement)
    # One policy fewer: the kind of small change a re-apply must handle cheaply.
    smaller = render_ruleset(resolve(policies[:-1], pods))
    figures = {
        "ipt": _timed(lambda: render_ruleset(enforcement)),
        "xds": _timed(lambda: render_resources(enforcement)),
        "size": float(len(ruleset.rules)),
    }
    with scratch_netns() as netns:
        figures["apply"] = run_in_netns(netns, lambda: _timed(lambda: iptables.apply(ruleset)))
        figures["reapply"] = run_in_netns(
            netns, lambda: _timed(lambda: iptables.apply(smaller, ruleset))
        )
    return figures


def bench_render(sizes: tuple[int, ...] = (100, 1000, 10000), rounds: int = 3) -> list[RenderRow]:
    rows = []
    for size in sizes:
        policies, pods = synthetic_node(size)
        runs = [_render_round(policies, pods) for _ in range(rounds)]

        def median(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        rows.append(
            RenderRow(
                rules=size,
                iptables_rules=int(runs[0]["size"]),
                render_iptables_ms=median("ipt"),
                render_xds_ms=median("xds"),
                apply_ms=median("apply"),
                reapply_one_change_ms=median("reapply"),
                rounds=rounds,
            )
        )
    return rows


def render_table(rows: list[RenderRow]) -> str:
    header = "rules  iptables-rules  render-iptables  render-xds  apply  re-apply(1 change)"
    lines = [header]
    lines += [
        f"{r.rules:>5}  {r.iptables_rules:>14}  {r.render_iptables_ms:>12.1f} ms"
        f"  {r.render_xds_ms:>7.1f} ms  {r.apply_ms:>6.1f} ms  {r.reapply_one_change_ms:>8.1f} ms"
        for r in rows
    ]
    return "\n".join(lines)


def rows_json(rows: list[RenderRow]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
