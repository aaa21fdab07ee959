"""`steer bench services`: short connections to a ClusterIP, balanced by kube-proxy's
iptables DNAT and by steer's connect-time load balancing, with 10 and with 5,000
Services on the node.

One local node. The measured Service has two backends (nginx answering 200 from its
configuration, one worker each, in their own pods); the other Services (fillers) each have
one, so kube-proxy's
`KUBE-SERVICES` chain holds one rule per Service port, as on a real node, and steer's
`steer_svc` map one frontend per port. The kube-proxy rules are the lab's stand-in for
kube-proxy v1.20's iptables mode (steer.lab.kubeproxy): the same chains, the same rules in
the same shape, walked by the same kernel code. Two clients:

    kube_proxy   a pod steer does not steer (inject disabled): kube-proxy's DNAT chooses
    connect_lb   a pod on eBPF: connect4 chooses, no NAT on the packet path

No policy applies: the figures are the load balancing's, not a verdict's. The backends are
nginx rather than the Envoys of the other benches because a short connection is what is
measured: an Envoy backend spends ~80 us of CPU on each, nginx ~25 us, and what the
backend spends hides what the balancing costs. The load is wrk
inside the client pod: `Connection: close` makes every request a new connection (the
new-connection rate, and the lab cgroup's CPU per connection), and one keep-alive
connection gives the p50 of requests on an established connection. Service counts
alternate between rounds (10, 5000, 5000, 10, ...), the clients ABBA within each.

Thousands of connections a second leave as many conntrack entries in TIME_WAIT, kept 120 s
by default: the node's table (262,144 here) fills within a minute and then drops SYNs,
which measures the table, not the balancing. The bench keeps closed entries 1 s in the
lab node's namespace only (net.netfilter.nf_conntrack_tcp_timeout_time_wait), lets the
client pods reuse ports in TIME_WAIT (net.ipv4.tcp_tw_reuse, as load generators do), and
counts wrk's socket errors, which should stay 0.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from steer.bench import BenchOptions
from steer.bench.datapath import PORT, _cpu_usec, _rps_and_requests, in_pod, latency_ms
from steer.bench.plots import new_figure, save
from steer.bench.stats import abba, summarize
from steer.constants import (
    AGENT_STATUS_FILE,
    ANNOTATION_DATAPLANE,
    ANNOTATION_INJECT,
    LAB_SERVICE_CIDR,
    LABEL_ALLOW_OPT_OUT,
    NODE_NETNS,
)
from steer.lab.localnode import LocalNode, read_status, wait_for
from steer.lab.podproc import PodProcess
from steer.lab.services import LabService
from steer.lab.spec import LabPod, LabPodSpec
from steer.lab.updown import lab_up
from steer.lab.wiring import write_sysctls
from steer.model.service import Endpoint, ServicePort
from steer.node.cgroups import cgroup2_root

log = logging.getLogger("steer.bench")
CLIENTS = {"kube_proxy": "c-kp", "connect_lb": "c-lb"}
SERVERS = ("s-1", "s-2")
COUNTS = (10, 5000)
FIGURES = (
    "conn_per_s",
    "cpu_us_per_conn",
    "client_cpu_us_per_conn",
    "backends_cpu_us_per_conn",
    "keepalive_p50_ms",
)
# The measured Service sits in the middle of kube-proxy's chain, which is in no particular
# order on a real node (Go map order), so on average a flow walks half of it: the lab's
# stand-in orders the chain by Service name, so every Service is named by its position.
# Its ClusterIP stays the same at every Service count: the backends close first (the
# requests say `Connection: close`) and keep each connection in TIME_WAIT for 60 s, and
# the client's TCP timestamps are offset per destination address, so a new VIP would
# make the next round's SYNs look older than those TIME_WAIT entries to the backends'
# PAWS check, which drops them (a 1 s retransmit each: tens of connections a second).
MEASURED_IP = IPv4Network(LAB_SERVICE_CIDR).network_address + 1


def specs() -> list[LabPodSpec]:
    namespace = {LABEL_ALLOW_OPT_OUT: "true"}
    clients = {
        "c-kp": {ANNOTATION_INJECT: "disabled"},
        "c-lb": {ANNOTATION_DATAPLANE: "ebpf"},
    }
    servers = {name: {ANNOTATION_INJECT: "disabled"} for name in SERVERS}
    return [
        LabPodSpec(name, labels={"app": name}, annotations=annotations, namespace_labels=namespace)
        for name, annotations in {**clients, **servers}.items()
    ]


def nginx_config(ip: str, workdir: Path, name: str) -> str:
    """One worker answering 200 to everything on ip:PORT; nothing written per request."""
    files = workdir / name
    files.mkdir()
    temps = " ".join(
        f"{kind}_temp_path {files / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
worker_processes 1;
daemon off;
pid {files / "nginx.pid"};
error_log {files / "error.log"} error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    {temps}
    server {{ listen {ip}:{PORT}; location / {{ return 200 "ok"; }} }}
}}
"""


def nginx_backend(pod: LabPod, workdir: Path) -> AbstractContextManager[None]:
    path = workdir / f"nginx-{pod.name}.conf"
    path.write_text(nginx_config(pod.ip, workdir, pod.name))
    return in_pod(pod, ["nginx", "-c", str(path)])


def services(count: int, backends: dict[str, str]) -> list[LabService]:
    """`count` Services: the measured one (first) with both backends, and count - 1
    fillers with one each."""
    middle = count // 2
    measured = LabService(
        service_name(middle),
        "default",
        (ServicePort(80, PORT),),
        cluster_ip=str(MEASURED_IP),
        endpoints=tuple(Endpoint(IPv4Address(ip), {"": PORT}) for ip in backends.values()),
    )
    filler = (Endpoint(IPv4Address(backends[SERVERS[0]]), {"": PORT}),)
    return [
        measured,
        *(
            LabService(
                service_name(index),
                "default",
                (ServicePort(80, PORT),),
                cluster_ip=str(MEASURED_IP + 1 + index),
                endpoints=filler,
            )
            for index in range(count)
            if index != middle
        ),
    ]


def service_name(position: int) -> str:
    return f"svc-{position:05d}"


class ServicesBench:
    def __init__(self, node: LocalNode, clients: dict[str, PodProcess], seconds: int) -> None:
        self.node = node
        self.clients = clients
        self.seconds = seconds
        self.cgroup_root = cgroup2_root() / "steer"
        self.backends = {name: node.ip(name) for name in SERVERS}
        self.vip = ""
        self.errors = 0

    def use(self, count: int) -> None:
        """Make the node hold `count` Services and wait until the agent balances them."""
        wanted = services(count, self.backends)
        self.vip = str(wanted[0].cluster_ip)
        started = time.time()
        self.node.lab = lab_up(self.node.specs, services=wanted)

        def balanced() -> bool:
            status = read_status(AGENT_STATUS_FILE) or {}
            listed = status.get("services") or []
            return status.get("loaded_at", 0) >= started and len(listed) == count

        wait_for(balanced, 120, f"the agent to balance {count} Services")
        wait_quiet()

    def _wrk(self, client: str, argv: list[str]) -> str:
        code, out, err = self.clients[client].run(
            ["wrk", *argv, f"http://{self.vip}:80/"], timeout=self.seconds + 30
        )
        if code != 0:
            raise RuntimeError(f"wrk from {client} failed: {err or out}")
        return out

    def short_lived_conntrack(self) -> None:
        write_sysctls(NODE_NETNS, {"net/netfilter/nf_conntrack_tcp_timeout_time_wait": "1"})
        # wrk closes first, so each client keeps its closed connections in TIME_WAIT (60 s):
        # without reuse its ~28k ports to one address last ~10 s at these rates, and then
        # connect() burns the CPU searching for a free one.
        for pod in CLIENTS.values():
            write_sysctls(
                self.node.netns(pod),
                {"net/ipv4/tcp_tw_reuse": "1", "net/ipv4/ip_local_port_range": "1024 65535"},
            )

    def measure(self, client: str, into: dict[str, list[float]]) -> None:
        # The whole lab, and its parts: the client pod (wrk, and the kernel work its sends
        # and connects run), the backend pods; the rest is the node (agent, Envoy, softirqs).
        parts = {
            "cpu_us_per_conn": [self.cgroup_root],
            "client_cpu_us_per_conn": [Path(self.node.lab.pod("default", CLIENTS[client]).cgroup)],
            "backends_cpu_us_per_conn": [
                Path(self.node.lab.pod("default", name).cgroup) for name in SERVERS
            ],
        }
        before = {part: sum(map(_cpu_total, paths)) for part, paths in parts.items()}
        short = self._wrk(client, ["-t2", "-c8", f"-d{self.seconds}s", "-H", "Connection: close"])
        after = {part: sum(map(_cpu_total, paths)) for part, paths in parts.items()}
        rate, connections = _rps_and_requests(short)
        keepalive = self._wrk(client, ["-t1", "-c1", f"-d{self.seconds}s", "--latency"])
        errors = _socket_errors(short)
        if errors:
            self.errors += errors
        into["conn_per_s"].append(rate)
        for part in parts:
            into[part].append((after[part] - before[part]) / max(connections, 1))
        into["keepalive_p50_ms"].append(latency_ms(keepalive, "50"))


def _machine_busy(seconds: float) -> float:
    """The share of all CPUs busy over `seconds` (0 to 1), from /proc/stat."""

    def read() -> tuple[int, int]:
        # user nice system idle iowait irq softirq steal (guest time is in user already)
        fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = read()
    time.sleep(seconds)
    busy1, total1 = read()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_quiet(under: float = 0.1, timeout: float = 60) -> None:
    """Wait until the machine is nearly idle: after a change of 5,000 Services the control
    plane, the agent and Envoy work on for seconds after the agent reports the change, and
    a round measured meanwhile shares the CPUs with them (the spread of the runs was wide,
    and its low end came from such rounds)."""
    deadline = time.monotonic() + timeout
    while (busy := _machine_busy(0.5)) >= under:
        if time.monotonic() > deadline:
            log.warning(
                "the machine is still %.0f%% busy after %.0f s: measuring anyway",
                busy * 100,
                timeout,
            )
            return


def _cpu_total(cgroup: Path) -> int:
    return sum(_cpu_usec(cgroup))


def _socket_errors(text: str) -> int:
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return sum(int(n) for n in match.groups()) if match else 0


def _key(client: str, count: int) -> str:
    return f"{client}_{count}"


def bench_services(
    rounds: int = 4,
    seconds: int = 3,
    counts: tuple[int, ...] = COUNTS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {
        _key(c, n): {f: [] for f in FIGURES} for c in CLIENTS for n in counts
    }
    with LocalNode.start(specs=specs(), policies={}, services=[]) as node, ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for server in SERVERS:
            stack.enter_context(nginx_backend(node.lab.pod("default", server), workdir))
        clients = {
            config: stack.enter_context(
                PodProcess.start(node.netns(pod), node.lab.pod("default", pod).cgroup)
            )
            for config, pod in CLIENTS.items()
        }
        bench = ServicesBench(node, clients, seconds)
        bench.short_lived_conntrack()
        order = list(abba(counts, rounds))
        for step, count in enumerate(order, 1):
            bench.use(count)
            for client in CLIENTS:  # warm-up after the change: caches, connection tables
                bench._wrk(client, ["-t1", "-c1", "-d1s", "-H", "Connection: close"])
            for client in abba(tuple(CLIENTS), 1):
                if progress:
                    progress(f"[{step}/{len(order)}] {count} Services, {client}")
                bench.measure(client, samples[_key(client, count)])
    result = {key: summarize(values) for key, values in samples.items()}
    return {
        "scenario": "services",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "configs": result,
        **{figure: {key: result[key][figure] for key in result} for figure in FIGURES},
        "socket_errors": bench.errors,
        "targets": targets(result, counts),
    }


def targets(result: dict[str, Any], counts: tuple[int, ...]) -> dict[str, bool]:
    low, high = min(counts), max(counts)
    lb_high = result[_key("connect_lb", high)]["conn_per_s"]
    return {
        f"connect_lb_{high} >= 1.3x kube_proxy_{high} conn/s": lb_high
        >= 1.3 * result[_key("kube_proxy", high)]["conn_per_s"],
        f"connect_lb_{high} >= 0.95x connect_lb_{low} conn/s": lb_high
        >= 0.95 * result[_key("connect_lb", low)]["conn_per_s"],
    }


def run(options: BenchOptions) -> dict[str, Any]:
    if options.quick:
        return bench_services(1, 1, (2, 20), options.progress)
    return bench_services(options.rounds, 3, COUNTS, options.progress)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'path, Services':<18} {'conn/s':>9} {'CPU us/conn':>12} {'client':>7} "
        f"{'backends':>9} {'keep-alive p50 ms':>18}"
    ]
    for key, figures in result["configs"].items():
        lo, hi = figures["min"], figures["max"]
        lines.append(
            f"{key:<18} {figures['conn_per_s']:>9.0f} {figures['cpu_us_per_conn']:>12.1f} "
            f"{figures['client_cpu_us_per_conn']:>7.1f} "
            f"{figures['backends_cpu_us_per_conn']:>9.1f} "
            f"{figures['keepalive_p50_ms']:>18.3f}   "
            f"(conn/s {lo['conn_per_s']:.0f}-{hi['conn_per_s']:.0f})"
        )
    lines += [
        f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in result["targets"].items()
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, (left, right) = new_figure(2)
    names = list(result["configs"])
    left.bar(names, [result["configs"][n]["conn_per_s"] for n in names])
    left.set(ylabel="connections/s", title="new connections (one request each)")
    right.bar(names, [result["configs"][n]["cpu_us_per_conn"] for n in names])
    right.set(ylabel="CPU us", title="lab CPU per connection")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=25)
    save(figure, path)
