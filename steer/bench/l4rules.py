"""`steer bench l4-rules`: what L4 rules cost a direct flow (no HTTP rule, so no Envoy).

A client pod sends to a server pod through the node, both on the iptables datapath, with
the server's ingress guarded by N L4 rules: N decoys (distinct /32s in 172.16.0.0/12, which
never hold a lab pod) and last the one that lets the client in, so a linear walk goes
through all of them. The same rules are enforced two ways:

    per_flow     steer's own ruleset: the rules are an HTTPPolicy on the server; only a
                 flow's first packet walks them, later packets match the cached connmark
    per_packet   a plain filter chain (FORWARD -d server -> N decoys, the match, DROP),
                 loaded with iptables-legacy-restore: every packet to the server walks it
    0            a server no policy selects

One node carries every configuration at once, each on a server pod of its own, so nothing
reloads between rounds: the per_packet servers have no steer policy, so steer's rules do
for them exactly what they do for "0" (one cached-verdict match a packet), and the
difference is the plain chain alone. The load (steer.bench._traffic) runs inside the pods:
bulk is 64 KiB writes (Gbit/s), small is 64-byte round trips (messages/s), which put one
packet each way on the wire. Rounds are interleaved ABBA; figures are medians with min and
max.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from steer.bench import BenchOptions, _traffic
from steer.bench.plots import new_figure, save
from steer.bench.stats import abba
from steer.constants import ANNOTATION_DATAPLANE
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPodSpec
from steer.node import iptables
from steer.node.netns import run_in_netns

SIZES = (1000, 10000)
QUICK_SIZES = (100, 1000)
SECONDS = 2.0
QUICK_SECONDS = 0.5
# Before the rounds, every path carries a short run: it proves the flow is allowed (a
# walk that missed the client's rule would drop or reset it) and warms caches alike.
WARMUP_SECONDS = 0.2
PORT = 5201
FIGURES = ("bulk_gbps", "small_msgs_per_s")
KINDS = ("per_packet", "per_flow")
NO_RULES = "0"
# Results always carry this size's keys; with other sizes they hold the largest one run.
HEADLINE = 10000
TARGET = ("bulk_gbps", f"{HEADLINE}_per_flow", 0.95)
CLIENT = "l4-client"
# Rendering, applying and verifying 11k rules, in both agent and control plane.
SYNC_TIMEOUT_S = 180.0


def configs(sizes: tuple[int, ...]) -> tuple[str, ...]:
    return (NO_RULES, *(f"{size}_{kind}" for size in sizes for kind in KINDS))


def server_of(config: str) -> str:
    return "l4-s-" + ("none" if config == NO_RULES else config.replace("_", "-"))


def decoy(n: int) -> str:
    """The n-th decoy peer: in 172.16.0.0/12, far from the lab's 10.244.0.0/16."""
    return f"172.{16 + n // 65536}.{n // 256 % 256}.{n % 256}/32"


def specs(names: tuple[str, ...]) -> list[LabPodSpec]:
    iptables_only = {ANNOTATION_DATAPLANE: "iptables"}
    return [
        LabPodSpec(CLIENT, labels={"app": CLIENT}, annotations=iptables_only),
        *(
            LabPodSpec(server_of(c), labels={"app": server_of(c)}, annotations=iptables_only)
            for c in names
        ),
    ]


def flow_policy(server: str, size: int) -> str:
    # One rule per decoy, in order, then the client's: steer renders Allow rules in
    # policy order, so the client's flow walks every decoy first.
    decoys = "".join(
        f"      - {{from: [{{cidr: {decoy(n)}}}], ports: [{{port: {PORT}}}]}}\n"
        for n in range(size)
    )
    return (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: bench-{server}, namespace: default}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: {server}}}}}\n"
        "  ingress:\n    defaultAction: Deny\n    rules:\n"
        f"{decoys}"
        f"      - {{from: [{{podSelector: {{matchLabels: {{app: {CLIENT}}}}}}}], "
        f"ports: [{{port: {PORT}}}]}}\n"
    )


def packet_chain(size: int) -> str:
    # Not steer's prefix: the agent removes any chain of its prefix it did not render.
    return f"L4BENCH-{size}"


def packet_chain_text(size: int, client_ip: str, server_ip: str) -> str:
    chain = packet_chain(size)
    rules = [f"-A {chain} -s {decoy(n)} -p tcp --dport {PORT} -j ACCEPT" for n in range(size)]
    return "\n".join(
        [
            "*filter",
            f":{chain} - [0:0]",
            # First: kube-proxy's KUBE-FORWARD (the lab runs it for Services) accepts
            # every packet of an established flow, so a chain after it sees only SYNs.
            f"-I FORWARD 1 -d {server_ip}/32 -p tcp -j {chain}",
            *rules,
            f"-A {chain} -s {client_ip}/32 -p tcp --dport {PORT} -j ACCEPT",
            # As steer's defaultAction: Deny: a flow passes only through the last rule.
            f"-A {chain} -j DROP",
            "COMMIT\n",
        ]
    )


def _packet_chain_removal(size: int, server_ip: str) -> str:
    chain = packet_chain(size)
    return "\n".join(
        [
            "*filter",
            f"-D FORWARD -d {server_ip}/32 -p tcp -j {chain}",
            f":{chain} - [0:0]",  # declaring a chain flushes it, so -X may delete it
            f"-X {chain}",
            "COMMIT\n",
        ]
    )


def _restore(netns: str, text: str) -> None:
    run_in_netns(netns, lambda: iptables.restore(text))


@contextmanager
def packet_chains(netns: str, client_ip: str, servers: Mapping[int, str]) -> Iterator[None]:
    """The per_packet chains (size -> server address), removed again when the block ends."""
    installed: list[tuple[int, str]] = []
    try:
        for size, server_ip in servers.items():
            _restore(netns, packet_chain_text(size, client_ip, server_ip))
            installed.append((size, server_ip))
        yield
    finally:
        for size, server_ip in installed:
            _restore(netns, _packet_chain_removal(size, server_ip))


def _run_traffic(worker: PodProcess, *args: str, timeout: float) -> str:
    argv = [sys.executable, "-m", _traffic.__name__, *args]
    code, out, err = worker.run(argv, timeout=timeout)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}): {err or out}")
    return out


def measure(client: PodProcess, server_ip: str, seconds: float) -> dict[str, float]:
    out = _run_traffic(
        client, "measure", server_ip, str(PORT), str(seconds), timeout=2 * seconds + 30
    )
    figures = json.loads(out)
    return {name: float(figures[name]) for name in FIGURES}


def _pod_worker(node: LocalNode, pod: str) -> AbstractContextManager[PodProcess]:
    return PodProcess.start(node.netns(pod), node.lab.pod("default", pod).cgroup)


def run(options: BenchOptions) -> dict[str, Any]:
    sizes = QUICK_SIZES if options.quick else SIZES
    seconds = QUICK_SECONDS if options.quick else SECONDS
    names = configs(sizes)
    samples: dict[str, dict[str, list[float]]] = {c: {f: [] for f in FIGURES} for c in names}
    # The policies go in once the node runs: LocalNode.start waits only briefly for sync.
    with LocalNode.start(specs=specs(names), policies={}) as node, ExitStack() as stack:
        options.progress(f"loading {sum(sizes)} per-flow rules")
        flow_servers = {size: server_of(f"{size}_per_flow") for size in sizes}
        node.write_policies(
            {f"{server}.yaml": flow_policy(server, size) for size, server in flow_servers.items()}
        )
        node.wait_synced(timeout=SYNC_TIMEOUT_S)
        if (dataplane := node.dataplane_of(CLIENT)) != "iptables":
            raise RuntimeError(f"{CLIENT} is on {dataplane}, not iptables: no rule would run")
        client = stack.enter_context(_pod_worker(node, CLIENT))
        for config in names:
            server = stack.enter_context(_pod_worker(node, server_of(config)))
            _run_traffic(server, "serve", node.ip(server_of(config)), str(PORT), timeout=30)
        options.progress(f"loading {sum(sizes)} per-packet rules")
        stack.enter_context(
            packet_chains(
                node.lab.node_netns,
                node.ip(CLIENT),
                {size: node.ip(server_of(f"{size}_per_packet")) for size in sizes},
            )
        )
        for config in names:
            measure(client, node.ip(server_of(config)), WARMUP_SECONDS)
        order = list(abba(names, options.rounds))
        for step, config in enumerate(order, 1):
            options.progress(f"[{step}/{len(order)}] {config}")
            for name, value in measure(client, node.ip(server_of(config)), seconds).items():
                samples[config][name].append(value)
    return summarize(samples, sizes, seconds, options.rounds)


def summarize(
    samples: Mapping[str, Mapping[str, list[float]]],
    sizes: tuple[int, ...],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    largest = max(sizes)
    # Result key -> the configuration it reports; the headline keys always exist.
    keys = {config: config for config in samples}
    keys.update({f"{HEADLINE}_{kind}": f"{largest}_{kind}" for kind in KINDS})

    def per_key(how: Any, figure: str) -> dict[str, float]:
        return {key: float(how(samples[config][figure])) for key, config in keys.items()}

    result: dict[str, Any] = {
        "scenario": "l4-rules",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "sizes": {"ran": list(sizes), f"{HEADLINE}_keys_measured_at": largest},
    }
    for figure in FIGURES:
        result[figure] = per_key(statistics.median, figure)
    result["min"] = {figure: per_key(min, figure) for figure in FIGURES}
    result["max"] = {figure: per_key(max, figure) for figure in FIGURES}
    result["ratios_vs_0"] = {
        figure: {key: value / result[figure][NO_RULES] for key, value in result[figure].items()}
        for figure in FIGURES
    }
    figure, key, bound = TARGET
    ratio = result["ratios_vs_0"][figure][key]
    result["target"] = {
        "what": f"{figure} {key} >= {bound}x {NO_RULES}",
        "ratio": ratio,
        "met": ratio >= bound,
    }
    return result


def _ran(result: Mapping[str, Any]) -> list[str]:
    """The configurations that ran, without the headline keys that only alias one."""
    return list(configs(tuple(result["sizes"]["ran"])))


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'config':<18} {'bulk Gbit/s':>11} {'(min-max)':>13} {'small msg/s':>11} "
        f"{'(min-max)':>15} {'vs 0: bulk':>10} {'small':>6}"
    ]
    lo, hi, ratios = result["min"], result["max"], result["ratios_vs_0"]
    for config in _ran(result):
        bulk, small = (result[f][config] for f in FIGURES)
        lines.append(
            f"{config:<18} {bulk:>11.2f} {lo['bulk_gbps'][config]:>6.2f}-"
            f"{hi['bulk_gbps'][config]:<6.2f} {small:>11.0f} "
            f"{lo['small_msgs_per_s'][config]:>7.0f}-{hi['small_msgs_per_s'][config]:<7.0f} "
            f"{ratios['bulk_gbps'][config]:>9.2f}x {ratios['small_msgs_per_s'][config]:>5.2f}x"
        )
    largest = result["sizes"][f"{HEADLINE}_keys_measured_at"]
    if largest != HEADLINE:
        lines.append(f"(quick: the {HEADLINE}_* keys report the {largest}-rule runs)")
    target = result["target"]
    lines.append(
        f"target {target['what']}: {target['ratio']:.2f}x, {'met' if target['met'] else 'NOT met'}"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    names = _ran(result)
    colours = {"per_packet": "tab:red", "per_flow": "tab:green"}
    figure, panels = new_figure(2)
    for axes, name, label in zip(
        panels, FIGURES, ("bulk, Gbit/s", "64-byte round trips, msg/s"), strict=True
    ):
        medians = [result[name][c] for c in names]
        spread = [
            [m - result["min"][name][c] for c, m in zip(names, medians, strict=True)],
            [result["max"][name][c] - m for c, m in zip(names, medians, strict=True)],
        ]
        axes.bar(
            names,
            medians,
            yerr=spread,
            capsize=3,
            color=[colours.get(c.split("_", 1)[-1], "tab:grey") for c in names],
        )
        axes.set(title=f"{label}, median of {result['rounds']} (min-max)")
        axes.tick_params(axis="x", rotation=30)
    save(figure, path)
