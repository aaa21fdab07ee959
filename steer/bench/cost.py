"""`steer bench cost`: what each way a pod's traffic can go costs, side by side in one run.

Paths (one client and server pod pair each, on one local node, as `steer bench datapath`
sets them up; the servers are Envoy instances answering from a static route):

    direct          unsteered pods: no policy, no Envoy
    l4_ebpf         eBPF pods, the server with L4 rules only: connect4's verdict, direct
    l7_iptables     iptables pods, an HTTP rule: REDIRECT to the node's Envoy
    l7_ebpf_skmsg   eBPF pods, an HTTP rule: connect4 to the node's Envoy, sk_msg on
    l7_sidecar      Istio's sidecar model, built in the lab from the same Envoy and the same
                    policy: unsteered pods, each with its own Envoy; the client pod's
                    iptables send its outbound connects to its Envoy (15001), the server
                    pod's send inbound ones to its Envoy (15006), which holds the server's
                    route with the RBAC rules steer renders for it

Per path: p50 and p99 latency with one connection, and CPU per request (user and system,
the whole lab's cgroup subtree: clients, servers, the node's Envoy and the sidecars; and
steer's agent and control plane) with 16 connections; `node_envoy_user_us_per_req` is
the node Envoy's own share (its cgroup), on the paths through it. Rounds are interleaved
ABBA; figures are medians.

Memory (`envoy_rss_mb`): the node's Envoy with the configuration steer renders for N pods
(one HTTP policy per pod), against N sidecars, each an Envoy holding only its own pod's
inbound route and an outbound passthrough (scoped as by an Istio `Sidecar` resource: the
sidecar model's best case). Each is a real Envoy with that configuration, started in a
scratch network namespace; its VmRSS once ready, in MiB. Sidecar memory at N pods is N
times one sidecar's.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, socket_option_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict

from steer.bench import BenchOptions
from steer.bench.datapath import (
    PORT,
    DatapathBench,
    Samples,
    _cpu_usec,
    _rps_and_requests,
    backend,
    bench_node,
    envoy_in_pod,
    latency_ms,
)
from steer.bench.plots import new_figure, save
from steer.bench.stats import abba, summarize
from steer.constants import ANNOTATION_INJECT, LABEL_ALLOW_OPT_OUT
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPodSpec
from steer.model.enforce import resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.node.cgroups import cgroup2_root
from steer.node.envoy import envoy_binary
from steer.node.netns import run_in_netns
from steer.render.bootstrap import STATS_CONFIG
from steer.render.xds import (
    _ORIGINAL_DST,
    CLUSTER_TYPE,
    HCM_FILTER,
    LISTENER_TYPE,
    ROUTE_TYPE,
    _any_address,
    _http_connection_manager,
    original_dst_cluster,
    render_resources,
    route_name,
)

PATHS = ("direct", "l4_ebpf", "l7_iptables", "l7_ebpf_skmsg", "l7_sidecar")
# The `steer bench datapath` pair each path runs on (the sidecar pair is this scenario's).
PAIR_OF = {
    "direct": "direct",
    "l4_ebpf": "l4_direct",
    "l7_iptables": "iptables",
    "l7_ebpf_skmsg": "ebpf_skmsg",
}
NODE_ENVOY_PATHS = ("l7_iptables", "l7_ebpf_skmsg")
FIGURES = ("p50_ms", "p99_ms", "rps", "cpu_user_us_per_req", "cpu_sys_us_per_req")
NODE_ENVOY_FIGURE = "node_envoy_user_us_per_req"
SIDECAR_CLIENT, SIDECAR_SERVER = "c-side", "s-side"
SIDECAR_OUTBOUND_PORT, SIDECAR_INBOUND_PORT = 15001, 15006
# The mark the client sidecar's own upstream connections carry, so that its pod's
# iptables let them out instead of sending them back to it (Istio marks them the same
# way in its TPROXY mode; its REDIRECT mode tells them apart by user id).
SIDECAR_MARK = 0x539
SO_MARK = 36
POD_COUNTS = (10, 100, 1000)


def sidecar_specs() -> list[LabPodSpec]:
    unsteered = {ANNOTATION_INJECT: "disabled"}
    namespace = {LABEL_ALLOW_OPT_OUT: "true"}
    return [
        LabPodSpec(
            SIDECAR_CLIENT,
            labels={"app": SIDECAR_CLIENT, "role": "client"},
            annotations=unsteered,
            namespace_labels=namespace,
        ),
        LabPodSpec(
            SIDECAR_SERVER,
            labels={"app": SIDECAR_SERVER},
            annotations=unsteered,
            namespace_labels=namespace,
        ),
    ]


# --- Envoy configurations as static bootstraps ----------------------------------------------


def _inline_routes(
    listener: listener_pb2.Listener, routes: Mapping[str, route_pb2.RouteConfiguration]
) -> dict[str, Any]:
    """The listener with each connection manager's RDS reference replaced by the route
    itself: a static bootstrap has no control plane to ask."""
    copy = listener_pb2.Listener()
    copy.CopyFrom(listener)
    chains = [*copy.filter_chains, copy.default_filter_chain]
    for chain in chains:
        for network_filter in chain.filters:
            hcm = hcm_pb2.HttpConnectionManager()
            if not network_filter.typed_config.Unpack(hcm) or not hcm.HasField("rds"):
                continue
            hcm.route_config.CopyFrom(routes[hcm.rds.route_config_name])
            network_filter.typed_config.Pack(hcm)
    return MessageToDict(copy)


def _static_bootstrap(
    listeners: list[dict[str, Any]], clusters: list[cluster_pb2.Cluster], admin_port: int
) -> dict[str, Any]:
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        # The node's stats settings for every Envoy here: the same Envoy, tuned the same.
        "stats_config": STATS_CONFIG,
        "static_resources": {
            "listeners": listeners,
            "clusters": [MessageToDict(c) for c in clusters],
        },
    }


def _server_policy(app: str) -> str:
    """The benchmark's one rule, for the pods labelled app=`app`: GET from the clients."""
    return (
        "---\napiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: {app}, namespace: default}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n"
        "  ingress:\n    defaultAction: Deny\n    rules:\n"
        "      - from: [{podSelector: {matchLabels: {role: client}}}]\n"
        f"        ports: [{{port: {PORT}}}]\n        http: {{methods: [GET]}}\n"
    )


def _model(pod_count: int) -> tuple[list[Pod], str]:
    """`pod_count` server pods, each with its policy, and one client; the policies as
    YAML."""
    client = Pod("client", "default", "10.250.0.1", {"role": "client"})
    servers = [
        Pod(f"s{n}", "default", str(IPv4Address("10.251.0.0") + n + 1), {"app": f"s{n}"})
        for n in range(pod_count)
    ]
    return [client, *servers], "".join(_server_policy(pod.name) for pod in servers)


def _enforcement(pods: list[Pod], text: str) -> Any:
    loaded, errors = parse_policies(text, "cost.yaml")
    if errors:
        raise RuntimeError(f"the benchmark's own policies do not load: {errors}")
    return resolve(loaded, pods)


def node_envoy_config(pods: list[Pod], text: str, admin_port: int) -> dict[str, Any]:
    """What the node's Envoy runs for these pods, as steer renders it."""
    resources = render_resources(_enforcement(pods, text))
    routes = resources[ROUTE_TYPE]
    listeners = [_inline_routes(r, routes) for r in resources[LISTENER_TYPE].values()]
    return _static_bootstrap(listeners, list(resources[CLUSTER_TYPE].values()), admin_port)


def _listener(name: str, port: int, hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    """A sidecar's listener, capturing like the node's: original destination restored."""
    config = any_pb2.Any()
    config.Pack(hcm)
    return listener_pb2.Listener(
        name=name,
        address=_any_address(port),
        listener_filters=[_ORIGINAL_DST],
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=config)]
            )
        ],
    )


def _passthrough_route() -> route_pb2.RouteConfiguration:
    """The client sidecar's outbound route: every request to where it was going."""
    return route_pb2.RouteConfiguration(
        name="outbound",
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="any",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=original_dst_cluster().name),
                    )
                ],
            )
        ],
    )


def sidecar_config(
    pods: list[Pod], text: str, pod_ip: str, admin_port: int, *, marked: bool = False
) -> dict[str, Any]:
    """One pod's sidecar: inbound (15006) with the pod's own route as steer renders it,
    RBAC rules included; outbound (15001) passing every request on. `marked`: upstream
    connections carry SIDECAR_MARK (the client pod's iptables let those out)."""
    routes = render_resources(_enforcement(pods, text))[ROUTE_TYPE]
    inbound = _http_connection_manager("sidecar-inbound", "")
    inbound.ClearField("rds")
    # Istio's sidecars log no request by default; the node's Envoy here logs none either.
    inbound.ClearField("access_log")
    inbound.route_config.CopyFrom(routes[route_name(_slash32(pod_ip))])
    outbound = _http_connection_manager("sidecar-outbound", "")
    outbound.ClearField("rds")
    outbound.ClearField("access_log")
    outbound.route_config.CopyFrom(_passthrough_route())
    cluster = original_dst_cluster()
    if marked:
        cluster.upstream_bind_config.source_address.CopyFrom(
            address_pb2.SocketAddress(address="0.0.0.0", port_value=0)
        )
        cluster.upstream_bind_config.socket_options.append(
            socket_option_pb2.SocketOption(level=1, name=SO_MARK, int_value=SIDECAR_MARK)
        )
    listeners = [
        MessageToDict(_listener("inbound", SIDECAR_INBOUND_PORT, inbound)),
        MessageToDict(_listener("outbound", SIDECAR_OUTBOUND_PORT, outbound)),
    ]
    return _static_bootstrap(listeners, [cluster], admin_port)


def _slash32(ip: str) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


# --- the sidecar path in the lab --------------------------------------------------------------


def _iptables(netns: str, *rules: str) -> None:
    for rule in rules:
        subprocess.run(
            ["ip", "netns", "exec", netns, "iptables-legacy", "-t", "nat", *rule.split()],
            check=True,
            capture_output=True,
        )


@contextmanager
def sidecars(node: LocalNode, workdir: Path, base_id: int) -> Iterator[None]:
    """The sidecar pair's Envoys, and the iptables in their pods that capture traffic."""
    client, server = (node.lab.pod("default", n) for n in (SIDECAR_CLIENT, SIDECAR_SERVER))
    lab_pods = [
        Pod(client.name, "default", client.ip, dict(client.labels)),
        Pod(server.name, "default", server.ip, dict(server.labels)),
    ]
    text = _server_policy(SIDECAR_SERVER)
    _iptables(
        client.netns,
        f"-A OUTPUT -p tcp -d {server.ip} --dport {PORT} -m mark ! --mark {SIDECAR_MARK} "
        f"-j REDIRECT --to-ports {SIDECAR_OUTBOUND_PORT}",
    )
    _iptables(
        server.netns,
        f"-A PREROUTING -p tcp --dport {PORT} -j REDIRECT --to-ports {SIDECAR_INBOUND_PORT}",
    )
    with ExitStack() as stack:
        for offset, (pod, marked) in enumerate(((client, True), (server, False))):
            config = sidecar_config(lab_pods, text, pod.ip, 19100 + offset, marked=marked)
            stack.enter_context(envoy_in_pod(pod, config, base_id + offset, workdir, "sidecar"))
        yield


# --- latency and CPU -------------------------------------------------------------------------


@dataclass
class CostBench:
    bench: DatapathBench
    sidecar_client: PodProcess
    node_cgroup: Path
    samples: dict[str, Samples] = field(
        default_factory=lambda: {
            path: Samples({f: [] for f in (*FIGURES, NODE_ENVOY_FIGURE)}) for path in PATHS
        }
    )

    def _wrk(self, path: str, connections: int) -> str:
        if path != "l7_sidecar":
            return self.bench._wrk(PAIR_OF[path], connections)
        node = self.bench.node
        argv = [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{self.bench.seconds}s",
            "--latency",
            f"http://{node.ip(SIDECAR_SERVER)}:{PORT}/",
        ]
        code, out, err = self.sidecar_client.run(argv, timeout=self.bench.seconds + 30)
        if code != 0:
            raise RuntimeError(f"wrk for l7_sidecar failed: {err or out}")
        return out

    def measure(self, path: str) -> None:
        self.bench._skmsg(path == "l7_ebpf_skmsg")
        latency = self._wrk(path, 1)
        lab0, envoy0 = self.bench.node_cpu_usec(), _cpu_usec(self.node_cgroup)
        load = self._wrk(path, 16)
        lab1, envoy1 = self.bench.node_cpu_usec(), _cpu_usec(self.node_cgroup)
        rps, requests = _rps_and_requests(load)
        requests = max(requests, 1)
        values = self.samples[path].values
        for name, value in (
            ("p50_ms", latency_ms(latency, "50")),
            ("p99_ms", latency_ms(latency, "99")),
            ("rps", rps),
            ("cpu_user_us_per_req", (lab1[0] - lab0[0]) / requests),
            ("cpu_sys_us_per_req", (lab1[1] - lab0[1]) / requests),
            (NODE_ENVOY_FIGURE, (envoy1[0] - envoy0[0]) / requests),
        ):
            values[name].append(value)


def _wait_sidecar(client: PodProcess, ip: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.request(ip, PORT, "GET", "/").status == 200:
                return
        except Exception:  # the sidecars are still starting
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


# --- memory ----------------------------------------------------------------------------------


def envoy_rss_mb(config: dict[str, Any], admin_port: int) -> float:
    """VmRSS of an Envoy running `config` once it is ready, in a scratch namespace."""
    netns = f"steer-cost-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "envoy.json"
            path.write_text(json.dumps(config))
            proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", netns, envoy_binary(), "-c", str(path),
                    "--base-id", str(40 + admin_port % 100), "--concurrency", "1",
                    "--log-level", "error",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                run_in_netns(netns, lambda: _wait_ready(admin_port))
                return _rss_mb(_envoy_pid(proc.pid))
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def _wait_ready(admin_port: int) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.read().strip() == b"LIVE":
                    time.sleep(1)  # workers' listeners and their memory
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("Envoy did not become ready for the memory measurement")
        time.sleep(0.2)


def _envoy_pid(pid: int) -> int:
    """`ip netns exec` execs Envoy, or, through the wheel's launcher, starts it as a child."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def memory(pod_counts: tuple[int, ...]) -> dict[str, dict[str, float]]:
    node: dict[str, float] = {}
    sidecars: dict[str, float] = {}
    for count in pod_counts:
        pods, text = _model(count)
        node[str(count)] = round(envoy_rss_mb(node_envoy_config(pods, text, 19300), 19300), 1)
        one = envoy_rss_mb(sidecar_config(pods, text, pods[1].ip, 19301), 19301)
        sidecars[str(count)] = round(one * count, 1)
    return {"node": node, "sidecars": sidecars}


# --- the scenario ----------------------------------------------------------------------------


def bench_cost(
    rounds: int = 3,
    seconds: int = 3,
    pod_counts: tuple[int, ...] = POD_COUNTS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    cost: CostBench
    with bench_node(seconds, sidecar_specs()) as (bench, stack, workdir):
        node = bench.node
        stack.enter_context(backend(node.lab.pod("default", SIDECAR_SERVER), 30, workdir))
        stack.enter_context(sidecars(node, workdir, 31))
        side = node.lab.pod("default", SIDECAR_CLIENT)
        sidecar_client = stack.enter_context(PodProcess.start(side.netns, side.cgroup))
        bench._access_log(False)
        _wait_sidecar(sidecar_client, node.ip(SIDECAR_SERVER))
        cost = CostBench(bench, sidecar_client, cgroup2_root() / "steer" / "node")
        for path in PATHS:  # warm-up
            cost._wrk(path, 1)
        order = list(abba(PATHS, rounds))
        for step, path in enumerate(order, 1):
            if progress:
                progress(f"[{step}/{len(order)}] {path}")
            cost.measure(path)
    if progress:
        progress("Envoy memory")
    summaries = {path: summarize(samples.values) for path, samples in cost.samples.items()}
    paths = {
        path: {
            **{name: round(float(summary[name]), 4) for name in FIGURES},
            **(
                {NODE_ENVOY_FIGURE: round(float(summary[NODE_ENVOY_FIGURE]), 1)}
                if path in NODE_ENVOY_PATHS
                else {}
            ),
        }
        for path, summary in summaries.items()
    }
    direct = paths["direct"]
    vs_direct = {
        path: {
            "p50": figures["p50_ms"] / direct["p50_ms"],
            "cpu_per_req": (figures["cpu_user_us_per_req"] + figures["cpu_sys_us_per_req"])
            / (direct["cpu_user_us_per_req"] + direct["cpu_sys_us_per_req"]),
        }
        for path, figures in paths.items()
    }
    rss = memory(pod_counts)
    ebpf, ipt = paths["l7_ebpf_skmsg"], paths["l7_iptables"]
    targets = {
        "node Envoy user CPU per L7 request <= 40 us": max(
            paths[p][NODE_ENVOY_FIGURE] for p in NODE_ENVOY_PATHS
        )
        <= 40,
        "p50 l7_ebpf_skmsg/l7_iptables <= 0.70": ebpf["p50_ms"] / ipt["p50_ms"] <= 0.70,
        "rps l7_ebpf_skmsg/l7_iptables >= 1.3": ebpf["rps"] / ipt["rps"] >= 1.3,
        "p50 l7_ebpf_skmsg/direct <= 2.5": vs_direct["l7_ebpf_skmsg"]["p50"] <= 2.5,
    }
    if "100" in rss["node"]:
        targets["node Envoy memory <= 0.2x sidecars at 100 pods"] = (
            rss["node"]["100"] <= 0.2 * rss["sidecars"]["100"]
        )
    return {
        "scenario": "cost",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "paths": paths,
        "vs_direct": {p: {k: round(v, 3) for k, v in r.items()} for p, r in vs_direct.items()},
        "envoy_rss_mb": rss,
        "targets": targets,
    }


def run(options: BenchOptions) -> dict[str, Any]:
    if options.quick:
        return bench_cost(1, 1, (10,), options.progress)
    return bench_cost(options.rounds, 3, POD_COUNTS, options.progress)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per path: what it costs, as a multiple of direct."""
    lines = []
    for path, figures in result["paths"].items():
        ratio = result["vs_direct"][path]
        lines.append(
            f"{path}: p50 {figures['p50_ms']:.3f} ms ({ratio['p50']:.2f}x direct), "
            f"{figures['cpu_user_us_per_req'] + figures['cpu_sys_us_per_req']:.0f} us CPU "
            f"per request ({ratio['cpu_per_req']:.2f}x direct)"
        )
    return lines


def table(result: dict[str, Any]) -> str:
    header = (
        f"{'path':<14} {'p50 ms':>7} {'p99 ms':>7} {'rps':>7} {'user us':>8} {'sys us':>7} "
        f"{'node Envoy us':>13}"
    )
    rows = [header]
    for path, f in result["paths"].items():
        envoy = f.get(NODE_ENVOY_FIGURE)
        rows.append(
            f"{path:<14} {f['p50_ms']:>7.3f} {f['p99_ms']:>7.3f} {f['rps']:>7.0f} "
            f"{f['cpu_user_us_per_req']:>8.1f} {f['cpu_sys_us_per_req']:>7.1f} "
            f"{'' if envoy is None else f'{envoy:.1f}':>13}"
        )
    rss = result["envoy_rss_mb"]
    rows += [
        f"Envoy memory at {count} pods: node {rss['node'][count]:.1f} MiB, "
        f"sidecars {rss['sidecars'][count]:.1f} MiB"
        for count in rss["node"]
    ]
    rows += summary_lines(result)
    rows += [
        f"target {name}: {'met' if met else 'NOT met'}" for name, met in result["targets"].items()
    ]
    return "\n".join(rows)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, (cpu, latency, rss) = new_figure(3)
    names = list(result["paths"])
    user = [result["paths"][n]["cpu_user_us_per_req"] for n in names]
    system = [result["paths"][n]["cpu_sys_us_per_req"] for n in names]
    cpu.bar(names, user, label="user")
    cpu.bar(names, system, bottom=user, label="system")
    cpu.set(title="CPU per request (whole lab)", ylabel="us")
    cpu.legend()
    latency.bar(names, [result["paths"][n]["p50_ms"] for n in names])
    latency.set(title="p50 latency, 1 connection", ylabel="ms")
    for axes in (cpu, latency):
        axes.tick_params(axis="x", rotation=30)
    counts = list(result["envoy_rss_mb"]["node"])
    positions = range(len(counts))
    rss.bar(
        [p - 0.2 for p in positions],
        [result["envoy_rss_mb"]["node"][c] for c in counts],
        0.4,
        label="node Envoy",
    )
    rss.bar(
        [p + 0.2 for p in positions],
        [result["envoy_rss_mb"]["sidecars"][c] for c in counts],
        0.4,
        label="sidecars",
    )
    rss.set(title="Envoy memory", ylabel="MiB", xlabel="pods", yscale="log")
    rss.set_xticks(list(positions), counts)
    rss.legend()
    save(figure, path)
