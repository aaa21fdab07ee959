"""`steer bench datapath`: the same HTTP load through each way a pod's traffic can go.

One local node carries every configuration at once, each client and server pod pair on
its own path, so nothing restarts between rounds:

    direct      client and server unsteered (inject disabled)     -> no policy, no Envoy
    iptables    client on iptables, server with an HTTP rule      -> REDIRECT -> Envoy
    ebpf        client on eBPF, sk_msg off                        -> connect4 -> Envoy
    ebpf_skmsg  client on eBPF, sk_msg on                         -> connect4 -> Envoy, sockmap
    l4_direct   client on eBPF, server with L4 rules only         -> connect4 verdict, direct

Servers are Envoy instances answering from a static route in their pod (a Python server
would measure Python). The load is wrk, run inside the client pod (its netns and cgroup).
Rounds are interleaved ABBA; figures are medians with min and max. CPU time is what the
node used per 10,000 requests: the cgroup subtree of the whole lab (clients, servers, node
Envoy), from cgroup v2's cpu.stat, and steer's agent and control plane, which share the
node's cores with them (the agent reads every observed request).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.bench import BenchOptions
from steer.bench.memory import pid_of, processes_cpu_usec
from steer.bench.plots import new_figure, save
from steer.bench.stats import abba, summarize
from steer.constants import (
    ANNOTATION_DATAPLANE,
    ANNOTATION_INJECT,
    LAB_GATEWAY_IP,
    LABEL_ALLOW_OPT_OUT,
    NODE_NETNS,
)
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPod, LabPodSpec
from steer.node.bpfobjects import BpfObjects
from steer.node.cgroups import cgroup2_root
from steer.node.envoy import envoy_binary, set_access_log_percent
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns

CONFIGS = (
    "direct",
    "iptables",
    "ebpf",
    "ebpf_skmsg",
    "l4_direct",
    "iptables_observed",
    "ebpf_skmsg_observed",
)
# The same pods as their base config, with Envoy's access log to the agent (steer observe)
# on; every other config runs with it off (Envoy runtime, steer.render.xds).
OBSERVED = {"iptables_observed": "iptables", "ebpf_skmsg_observed": "ebpf_skmsg"}
FIGURES = ("p50_ms_c1", "p99_ms_c1", "rps_c16", "cpu_user_s_per_10k", "cpu_sys_s_per_10k")
PORT = 8080
# (client pod, server pod, client annotations, server annotations)
PAIRS: dict[str, tuple[str, str, dict[str, str], dict[str, str]]] = {
    "direct": (
        "c-direct",
        "s-direct",
        {ANNOTATION_INJECT: "disabled"},
        {ANNOTATION_INJECT: "disabled"},
    ),
    "iptables": (
        "c-ipt",
        "s-ipt",
        {ANNOTATION_DATAPLANE: "iptables"},
        {ANNOTATION_DATAPLANE: "iptables"},
    ),
    "ebpf": ("c-bpf", "s-bpf", {ANNOTATION_DATAPLANE: "ebpf"}, {ANNOTATION_DATAPLANE: "ebpf"}),
    "ebpf_skmsg": (
        "c-msg",
        "s-msg",
        {ANNOTATION_DATAPLANE: "ebpf"},
        {ANNOTATION_DATAPLANE: "ebpf"},
    ),
    "l4_direct": ("c-l4", "s-l4", {ANNOTATION_DATAPLANE: "ebpf"}, {ANNOTATION_DATAPLANE: "ebpf"}),
}
L7_SERVERS = ("s-ipt", "s-bpf", "s-msg")


def _policy(name: str, servers: tuple[str, ...], http: bool) -> str:
    rule = "\n        http: {methods: [GET]}" if http else ""
    return (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        "spec:\n  podSelector:\n    matchExpressions:\n"
        f"      - {{key: app, operator: In, values: [{', '.join(servers)}]}}\n"
        "  ingress:\n    defaultAction: Deny\n    rules:\n"
        f"      - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n"
        f"        ports: [{{port: {PORT}}}]{rule}\n"
    )


def specs() -> list[LabPodSpec]:
    # A pod's own opt-out counts only where its namespace allows it.
    namespace = {LABEL_ALLOW_OPT_OUT: "true"}
    out = []
    for client, server, client_ann, server_ann in PAIRS.values():
        out.append(
            LabPodSpec(
                client,
                labels={"app": client, "role": "client"},
                annotations=client_ann,
                namespace_labels=namespace,
            )
        )
        out.append(
            LabPodSpec(
                server, labels={"app": server}, annotations=server_ann, namespace_labels=namespace
            )
        )
    return out


def policies() -> dict[str, str]:
    return {
        "bench-l7.yaml": _policy("bench-l7", L7_SERVERS, http=True),
        "bench-l4.yaml": _policy("bench-l4", ("s-l4",), http=False),
    }


def _backend_bootstrap(ip: str, admin_port: int) -> dict[str, object]:
    route = {
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                    }
                ],
            }
        ]
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "backend",
        "route_config": route,
        "http_filters": [
            {
                "name": "router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "backend",
                    "address": {"socket_address": {"address": ip, "port_value": PORT}},
                    "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
                }
            ]
        },
    }


@contextmanager
def in_pod(pod: LabPod, argv: Sequence[str]) -> Iterator[None]:
    """A process running `argv` inside the pod (its netns and cgroup), stopped on exit."""
    script = f"echo $$ > {pod.cgroup}/cgroup.procs && exec ip netns exec {pod.netns} " + shlex.join(
        argv
    )
    proc = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def envoy_in_pod(
    pod: LabPod, config: dict[str, object], base_id: int, workdir: Path, role: str
) -> contextlib.AbstractContextManager[None]:
    """An Envoy running `config` inside the pod."""
    path = workdir / f"{role}-{pod.name}.json"
    path.write_text(json.dumps(config))
    argv = [envoy_binary(), "-c", str(path), "--base-id", str(base_id)]
    return in_pod(pod, [*argv, "--concurrency", "1", "--log-level", "error"])


def backend(pod: LabPod, base_id: int, workdir: Path) -> contextlib.AbstractContextManager[None]:
    """An Envoy answering 200 from a static route, inside the server pod."""
    config = _backend_bootstrap(pod.ip, 19000 + base_id)
    return envoy_in_pod(pod, config, base_id, workdir, "backend")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"wrk printed no {percentile}% latency:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _rps_and_requests(text: str) -> tuple[float, int]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise ValueError(f"wrk printed no totals:\n{text}")
    return float(rps.group(1)), int(total.group(1))


def _cpu_usec(root: Path) -> tuple[int, int]:
    fields = dict(line.split() for line in (root / "cpu.stat").read_text().splitlines())
    return int(fields["user_usec"]), int(fields["system_usec"])


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in FIGURES})

    def summary(self) -> dict[str, Any]:
        return summarize(self.values)


class DatapathBench:
    def __init__(self, node: LocalNode, clients: dict[str, PodProcess], seconds: int) -> None:
        self.node = node
        self.clients = clients
        self.seconds = seconds
        self.cgroup_root = cgroup2_root() / "steer"
        # Outside the lab's cgroup subtree, which holds Envoy.
        self.steer_pids = [pid_of(role) for role in ("agent", "control")]

    def node_cpu_usec(self) -> tuple[int, int]:
        """User and system CPU the node has used: the lab's cgroup subtree, and steer's
        agent and control plane."""
        lab, steer = _cpu_usec(self.cgroup_root), processes_cpu_usec(self.steer_pids)
        return lab[0] + steer[0], lab[1] + steer[1]

    def _wrk(self, config: str, connections: int) -> str:
        server = PAIRS[OBSERVED.get(config, config)][1]
        threads = min(2, connections)
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{self.seconds}s",
            "--latency",
            f"http://{self.node.ip(server)}:{PORT}/",
        ]
        client = self.clients[OBSERVED.get(config, config)]
        code, out, err = client.run(argv, timeout=self.seconds + 30)
        if code != 0:
            raise RuntimeError(f"wrk for {config} failed: {err or out}")
        return out

    def _skmsg(self, on: bool) -> None:
        def set_flag() -> None:
            bpf = BpfObjects.load(HostKernel())
            try:
                bpf.set_skmsg(on)
            finally:
                bpf.close()

        run_in_netns(NODE_NETNS, set_flag)

    def _access_log(self, on: bool) -> None:
        set_access_log_percent(100 if on else 0)

    def measure(self, config: str, into: Samples) -> None:
        self._skmsg(OBSERVED.get(config, config) == "ebpf_skmsg")
        self._access_log(config in OBSERVED)
        latency = self._wrk(config, 1)
        user0, sys0 = self.node_cpu_usec()
        load = self._wrk(config, 16)
        user1, sys1 = self.node_cpu_usec()
        rps, requests = _rps_and_requests(load)
        per_10k = 10_000 / max(requests, 1) / 1e6
        for name, value in (
            ("p50_ms_c1", latency_ms(latency, "50")),
            ("p99_ms_c1", latency_ms(latency, "99")),
            ("rps_c16", rps),
            ("cpu_user_s_per_10k", (user1 - user0) * per_10k),
            ("cpu_sys_s_per_10k", (sys1 - sys0) * per_10k),
        ):
            into.values[name].append(value)


def ratios(result: dict[str, dict[str, Any]], base: str) -> dict[str, dict[str, float]]:
    return {
        config: {
            name: float(figures[name]) / float(result[base][name])
            if result[base][name]
            else float("nan")
            for name in FIGURES
        }
        for config, figures in result.items()
    }


TARGETS = {
    # ebpf_skmsg against iptables, and l4_direct against direct, as issue #3 sets them.
    "p50_ms_c1 ebpf_skmsg/iptables <= 0.70": ("vs_iptables", "ebpf_skmsg", "p50_ms_c1", 0.70, "le"),
    "cpu_sys_s_per_10k ebpf_skmsg/iptables <= 0.60": (
        "vs_iptables",
        "ebpf_skmsg",
        "cpu_sys_s_per_10k",
        0.60,
        "le",
    ),
    "rps_c16 ebpf_skmsg/iptables >= 1.2": ("vs_iptables", "ebpf_skmsg", "rps_c16", 1.2, "ge"),
    "rps_c16 l4_direct/direct >= 0.95": ("vs_direct", "l4_direct", "rps_c16", 0.95, "ge"),
    # Observing (the access log streamed to the agent) against the same path unobserved.
    "rps_c16 iptables_observed/iptables >= 0.95": (
        "vs_unobserved",
        "iptables_observed",
        "rps_c16",
        0.95,
        "ge",
    ),
    "cpu_s_per_10k iptables_observed/iptables <= 1.10": (
        "vs_unobserved",
        "iptables_observed",
        "cpu_s_per_10k",
        1.10,
        "le",
    ),
    "rps_c16 ebpf_skmsg_observed/ebpf_skmsg >= 0.95": (
        "vs_unobserved",
        "ebpf_skmsg_observed",
        "rps_c16",
        0.95,
        "ge",
    ),
    "cpu_s_per_10k ebpf_skmsg_observed/ebpf_skmsg <= 1.10": (
        "vs_unobserved",
        "ebpf_skmsg_observed",
        "cpu_s_per_10k",
        1.10,
        "le",
    ),
}


def unobserved_ratios(result: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each observed config against its base: rps, and CPU per request (user + sys)."""

    def cpu(figures: dict[str, Any]) -> float:
        return float(figures["cpu_user_s_per_10k"]) + float(figures["cpu_sys_s_per_10k"])

    return {
        observed: {
            "rps_c16": float(result[observed]["rps_c16"]) / float(result[base]["rps_c16"]),
            "cpu_s_per_10k": cpu(result[observed]) / cpu(result[base]),
        }
        for observed, base in OBSERVED.items()
    }


def run(options: BenchOptions) -> dict[str, Any]:
    return bench_datapath(options.rounds, 1 if options.quick else 2, options.progress)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, (left, right) = new_figure(2)
    names = list(result["configs"])
    left.bar(names, [result["configs"][n]["p50_ms_c1"] for n in names])
    left.set(ylabel="ms", title="p50 latency, 1 connection")
    right.bar(names, [result["configs"][n]["rps_c16"] for n in names])
    right.set(ylabel="requests/s", title="throughput, 16 connections")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=25)
    save(figure, path)


@contextmanager
def bench_node(
    seconds: int, extra: Sequence[LabPodSpec] = ()
) -> Iterator[tuple[DatapathBench, ExitStack, Path]]:
    """A local node with every pair's pods, backends and client workers, ready for load;
    `extra` pods besides, for the caller to furnish (with the stack and scratch dir)."""
    with (
        LocalNode.start(specs=[*specs(), *extra], policies=policies()) as node,
        ExitStack() as stack,
    ):
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for index, (_, server, _, _) in enumerate(PAIRS.values()):
            stack.enter_context(backend(node.lab.pod("default", server), 20 + index, workdir))
        clients = {
            config: stack.enter_context(
                PodProcess.start(node.netns(client), node.lab.pod("default", client).cgroup)
            )
            for config, (client, _, _, _) in PAIRS.items()
        }
        bench = DatapathBench(node, clients, seconds)
        _wait_backends(bench)
        yield bench, stack, workdir


def bench_datapath(
    rounds: int = 4, seconds: int = 2, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    samples = {config: Samples() for config in CONFIGS}
    with bench_node(seconds) as (bench, _, _):
        for config in CONFIGS:  # warm-up: connections pools, JIT-free but cache-cold paths
            bench._wrk(config, 1)
        order = list(abba(CONFIGS, rounds))
        for step, config in enumerate(order, 1):
            if progress:
                progress(f"[{step}/{len(order)}] {config}")
            bench.measure(config, samples[config])
    result = {config: s.summary() for config, s in samples.items()}
    comparisons = {
        "vs_iptables": ratios(result, "iptables"),
        "vs_direct": ratios(result, "direct"),
        "vs_unobserved": unobserved_ratios(result),
    }
    met = {
        name: (comparisons[table][config][figure] <= bound)
        if how == "le"
        else (comparisons[table][config][figure] >= bound)
        for name, (table, config, figure, bound, how) in TARGETS.items()
    }
    return {
        "scenario": "datapath",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "configs": result,
        "ratios": comparisons,
        "targets": met,
        "envoy_address": LAB_GATEWAY_IP,
    }


def _wait_backends(bench: DatapathBench) -> None:
    deadline = time.monotonic() + 15
    for config, (_, server, _, _) in PAIRS.items():
        while True:
            try:
                if (
                    bench.clients[config].request(bench.node.ip(server), PORT, "GET", "/").status
                    == 200
                ):
                    break
            except Exception:  # backend still starting
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


def table(result: dict[str, Any]) -> str:
    configs = result["configs"]
    header = (
        f"{'config':<11} {'p50 c1 ms':>10} {'p99 c1 ms':>10} {'rps c16':>9} "
        f"{'user s/10k':>11} {'sys s/10k':>10}"
    )
    lines = [header]
    for config, figures in configs.items():
        lo, hi = figures["min"], figures["max"]
        lines.append(
            f"{config:<11} {figures['p50_ms_c1']:>10.3f} {figures['p99_ms_c1']:>10.3f} "
            f"{figures['rps_c16']:>9.0f} {figures['cpu_user_s_per_10k']:>11.3f} "
            f"{figures['cpu_sys_s_per_10k']:>10.3f}   (rps {lo['rps_c16']:.0f}-{hi['rps_c16']:.0f})"
        )
    comparisons = result["ratios"]
    for base, label in (("vs_iptables", "iptables"), ("vs_direct", "direct")):
        parts = [
            f"{config} p50 {r['p50_ms_c1']:.2f}x rps {r['rps_c16']:.2f}x "
            f"sys {r['cpu_sys_s_per_10k']:.2f}x"
            for config, r in comparisons[base].items()
            if config != label
        ]
        lines.append(f"ratios against {label}: " + "; ".join(parts))
    targets = result["targets"]
    lines += [f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in targets.items()]
    return "\n".join(lines)
