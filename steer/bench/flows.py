"""`steer bench flows`: are flow events lost when short connections come fast?

One local node: a client pod on the eBPF datapath opens short connections (one request
each, wrk with `Connection: close`) to a server pod no policy covers, as fast as the
machine lets it, for a few seconds. Each connection is a flow connect4 records and sockops
reports at its close. The agent's metrics then say how many flow events reached it
(`steer_flows_total`) and how many the kernel's ring buffer had no room for
(`steer_ebpf_events_lost_total`). The promise: every connection is either an event or a
counted loss, never silently missing (events may exceed wrk's requests by the connections
still open when wrk stopped).

Thousands of connections a second leave as many sockets and conntrack entries in
TIME_WAIT; as in `steer bench services`, the node keeps closed entries 1 s and the client
reuses ports in TIME_WAIT.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from steer.bench import BenchOptions
from steer.bench.datapath import PORT, _rps_and_requests, backend
from steer.bench.plots import new_figure, save
from steer.bench.services import _socket_errors
from steer.constants import ANNOTATION_DATAPLANE, METRICS_PORT, NODE_NETNS
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPodSpec
from steer.lab.wiring import write_sysctls
from steer.node.netns import run_in_netns

CLIENT, SERVER = "c-flow", "s-flow"
EVENTS, LOST = "steer_flows_total", "steer_ebpf_events_lost_total"


def specs() -> list[LabPodSpec]:
    ebpf = {ANNOTATION_DATAPLANE: "ebpf"}
    return [
        LabPodSpec(CLIENT, labels={"app": CLIENT}, annotations=ebpf),
        LabPodSpec(SERVER, labels={"app": SERVER}, annotations=ebpf),
    ]


def counts() -> tuple[float, float]:
    """(flow events the agent got, events the kernel lost), from the agent's metrics."""

    def scrape() -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    events = lost = 0.0
    for family in text_string_to_metric_families(run_in_netns(NODE_NETNS, scrape)):
        for sample in family.samples:
            if sample.name == EVENTS and sample.labels.get("dataplane") == "ebpf":
                events += sample.value
            elif sample.name == LOST:
                lost += sample.value
    return events, lost


def settled() -> tuple[float, float]:
    """`counts` once the last closes have come through (two equal reads in a row)."""
    last = counts()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = counts()
        if now == last:
            return now
        last = now
    return last


def bench_flows(
    rounds: int = 1, seconds: int = 5, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """`rounds` runs of `seconds` each; counts are summed, the rate is the median."""
    with LocalNode.start(specs=specs(), policies={}) as node, ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(backend(node.lab.pod("default", SERVER), 60, workdir))
        client = stack.enter_context(
            PodProcess.start(node.netns(CLIENT), node.lab.pod("default", CLIENT).cgroup)
        )
        write_sysctls(NODE_NETNS, {"net/netfilter/nf_conntrack_tcp_timeout_time_wait": "1"})
        write_sysctls(
            node.netns(CLIENT),
            {"net/ipv4/tcp_tw_reuse": "1", "net/ipv4/ip_local_port_range": "1024 65535"},
        )
        url = f"http://{node.ip(SERVER)}:{PORT}/"

        def wrk(duration: int) -> str:
            argv = ["wrk", "-t2", "-c16", f"-d{duration}s", "-H", "Connection: close", url]
            code, out, err = client.run(argv, timeout=duration + 30)
            if code != 0:
                raise RuntimeError(f"wrk failed: {err or out}")
            return out

        deadline = time.monotonic() + 15
        while True:  # the backend Envoy takes a moment to listen
            try:
                if client.request(node.ip(SERVER), PORT, "GET", "/").status == 200:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        wrk(1)  # warm-up: the agent's ring reader, the conntrack table
        rates: list[float] = []
        requests = errors = 0
        events = lost = 0.0
        for step in range(1, rounds + 1):
            before = settled()
            if progress:
                progress(f"[{step}/{rounds}] {seconds} s of short connections")
            text = wrk(seconds)
            after = settled()
            rate, made = _rps_and_requests(text)
            rates.append(rate)
            requests += made
            errors += _socket_errors(text)
            events += after[0] - before[0]
            lost += after[1] - before[1]
    return {
        "scenario": "flows",
        "rounds": rounds,
        "seconds": seconds,
        "flows_per_s": statistics.median(rates),
        "connections": requests,
        "events": int(events),
        "lost": int(lost),
        "unaccounted": max(0, requests - int(events) - int(lost)),
        "socket_errors": errors,
        "targets": {
            "every flow an event or a counted loss": events + lost >= requests,
            "no event lost": lost == 0,
        },
    }


def run(options: BenchOptions) -> dict[str, Any]:
    return bench_flows(options.rounds, 2 if options.quick else 10, options.progress)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['flows_per_s']:.0f} short connections/s, {result['rounds']} x "
        f"{result['seconds']} s: "
        f"{result['connections']} connections, {result['events']} flow events, "
        f"{result['lost']} lost (counted), {result['unaccounted']} unaccounted",
    ]
    lines += [
        f"target {name}: {'met' if met else 'NOT met'}" for name, met in result["targets"].items()
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axes = new_figure(1)
    names = ["connections", "events", "lost"]
    axes.bar(names, [result[n] for n in names])
    axes.set(title=f"flow events at {result['flows_per_s']:.0f} connections/s", ylabel="count")
    save(figure, path)
