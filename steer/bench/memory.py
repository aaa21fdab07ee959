"""`steer bench memory`: resident memory of the agent and the control plane at 1k pods.

The node is the lab's real pods, with the client forced onto eBPF so that the agent runs
the eBPF datapath (its programs compiled with bcc and LLVM), plus modelled pods: entries
added to the lab state file with an address in the lab CIDR but no netns, veth or cgroup. Without a
cgroup they stay on iptables; in every other way agent and control plane treat them as
pods (selectors, rules, routes). One policy per 10 pods gives each a few L4 and HTTP rules.

Once agent, control plane and Envoy are in sync, `rounds` samples a few seconds apart read
each process's VmRSS and VmHWM (/proc/<pid>/status) and PSS (/proc/<pid>/smaps_rollup,
which shares pages such as libLLVM's out among the processes mapping them). Figures are
MiB: medians and maxima of RSS and PSS, and the peak RSS, reached while syncing.

The agent compiles in a short-lived child (`steer.node.bpfbuild`), so bcc and LLVM are not
in its memory; whether they are is checked in /proc/<pid>/maps and reported. What that
child costs while it runs is measured too: one more build into a scratch pin directory,
its peak RSS read from wait4's rusage.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from steer.atomicfile import write_json_atomic
from steer.bench import BenchOptions
from steer.bench.plots import new_figure, save
from steer.constants import (
    AGENT_STATUS_FILE,
    ANNOTATION_DATAPLANE,
    BPFFS,
    LAB_POD_CIDR,
    LAB_STATE_FILE,
)
from steer.lab.localnode import LocalNode, read_status
from steer.lab.spec import LabPodJSON, default_lab_specs
from steer.node.bpfbuild import build_command

PODS = 1000
QUICK_PODS = 50
PODS_PER_POLICY = 10
# One modelled pod in this many is a "frontend", the peer of every policy's HTTP rule.
FRONTEND_EVERY = 100
SAMPLE_INTERVAL_S = 3.0
QUICK_SAMPLE_INTERVAL_S = 0.5
NAMESPACE = "bench"
# Modelled pods number from here up, well above the few addresses the real pods get.
FIRST_MODELLED_HOST = 257
PROCESSES = ("agent", "control")
TARGETS_MB = {"agent": 200.0, "control": 150.0}
SYNC_TIMEOUT_S = 180.0
BUILD_POLL_S = 0.01


def modelled_pods(count: int) -> list[LabPodJSON]:
    network = ipaddress.ip_network(LAB_POD_CIDR)
    return [
        {
            "name": f"m{i}",
            "namespace": NAMESPACE,
            "ip": str(network[FIRST_MODELLED_HOST + i]),
            # Empty: no namespace, veth or cgroup exists for a modelled pod.
            "netns": "",
            "cgroup": "",
            "veth": "",
            "labels": {
                "app": f"m{i}",
                "group": f"g{i // PODS_PER_POLICY}",
                **({"role": "frontend"} if i % FRONTEND_EVERY == 0 else {}),
            },
            "annotations": {},
            "namespace_labels": {},
        }
        for i in range(count)
    ]


def policies(modelled: int) -> str:
    """One policy per group of pods: L4 from its own group, a service CIDR, a denied
    range; HTTP from the frontends and a health check from anywhere."""
    documents = [
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: g{group}, namespace: {NAMESPACE}}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{group: g{group}}}}}\n"
        "  ingress:\n    defaultAction: Deny\n    rules:\n"
        f"      - {{from: [{{podSelector: {{matchLabels: {{group: g{group}}}}}}}], "
        "ports: [{port: 5432}]}\n"
        "      - {from: [{cidr: 10.96.0.0/12}], ports: [{port: 9090}]}\n"
        f"      - {{action: Deny, from: [{{cidr: 172.16.{group % 256}.0/24}}]}}\n"
        "      - from: [{podSelector: {matchLabels: {role: frontend}}}]\n"
        "        ports: [{port: 8080}]\n"
        "        http: {methods: [GET, HEAD], paths: [{prefix: /api/}]}\n"
        "      - ports: [{port: 8080}]\n"
        "        http: {paths: [{exact: /healthz}]}\n"
        for group in range(-(-modelled // PODS_PER_POLICY))
    ]
    return "---\n".join(documents)


def add_modelled_pods(node: LocalNode, count: int) -> None:
    """Append modelled pods to the lab state the running agent and control plane read."""
    state = node.lab.to_json()
    state["pods"] += modelled_pods(count)
    write_json_atomic(LAB_STATE_FILE, state)


def pid_of(role: str) -> int:
    """This process's own `steer <role>` child: other labs' processes may run too."""
    found = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", f"steer.cli {role}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one `steer {role}` child, found {found or 'none'}")
    return int(found[0])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def processes_cpu_usec(pids: Iterable[int]) -> tuple[int, int]:
    """User and system CPU of processes, every thread of each, from /proc/PID/stat."""
    user = system = 0
    for pid in pids:
        # Fields after the command (which may hold spaces and ")"): state is 3, utime 14,
        # stime 15.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user * 1_000_000 // _CLOCK_TICKS, system * 1_000_000 // _CLOCK_TICKS


def _kb_field(path: Path, name: str) -> float | None:
    for line in path.read_text().splitlines():
        if line.startswith(f"{name}:"):
            return float(line.split()[1])
    return None


@dataclass(frozen=True)
class Usage:
    """One process's memory at one moment, in MiB."""

    rss: float
    pss: float | None  # None where the kernel has no smaps_rollup (before 4.14)
    peak: float  # the highest RSS so far (VmHWM)


def sample(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status")
    try:
        pss = _kb_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
    except FileNotFoundError:
        pss = None
    rss, hwm = _kb_field(status, "VmRSS"), _kb_field(status, "VmHWM")
    if rss is None or hwm is None:
        raise RuntimeError(f"no VmRSS/VmHWM in {status}")
    return Usage(rss / 1024, None if pss is None else pss / 1024, hwm / 1024)


def maps_llvm(pid: int) -> bool:
    """Whether the process has bcc's compiler library (and with it LLVM) mapped."""
    return "libbcc.so" in Path(f"/proc/{pid}/maps").read_text()


def bpf_build_peak_mb() -> float:
    """Peak RSS of one BPF build child, as the agent starts it, pinning into scratch.

    Read from the child's own VmHWM while it runs: wait4's ru_maxrss would also count the
    pages of the parent it was forked from (Linux folds the pre-exec high-water mark in),
    which in `steer bench all` is this benchmark process at several hundred MiB.
    """
    pins = BPFFS / f"steer-bench-{uuid.uuid4().hex[:8]}"
    peak_kb = 0.0
    try:
        with subprocess.Popen(
            build_command(pins), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        ) as child:
            status = Path(f"/proc/{child.pid}/status")
            while child.poll() is None:
                try:
                    peak_kb = max(peak_kb, _kb_field(status, "VmHWM") or 0.0)
                except (FileNotFoundError, ProcessLookupError):
                    break
                time.sleep(BUILD_POLL_S)
            _, stderr = child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"the BPF build failed: {stderr.decode(errors='replace')}")
    finally:
        # Unpinned and unattached (sk_msg hangs off the scratch sockhash only), the
        # programs and maps are freed with the pins.
        shutil.rmtree(pins, ignore_errors=True)
    return peak_kb / 1024


def run(options: BenchOptions) -> dict[str, Any]:
    total = QUICK_PODS if options.quick else PODS
    interval = QUICK_SAMPLE_INTERVAL_S if options.quick else SAMPLE_INTERVAL_S
    specs = [
        replace(s, annotations={ANNOTATION_DATAPLANE: "ebpf"}) if s.name == "client" else s
        for s in default_lab_specs()
    ]
    modelled = total - len(specs)
    samples: dict[str, list[Usage]] = {p: [] for p in PROCESSES}
    with LocalNode.start(specs=specs, policies={}) as node:
        options.progress(f"adding {modelled} modelled pods and their policies")
        add_modelled_pods(node, modelled)
        # Written after the pods: synced then means both processes loaded the new pods too.
        node.write_policies({"bench-memory.yaml": policies(modelled)})
        node.wait_synced(timeout=SYNC_TIMEOUT_S)
        agent = read_status(AGENT_STATUS_FILE) or {}
        if len(agent.get("pods", [])) != total:
            raise RuntimeError(f"the agent sees {len(agent.get('pods', []))} pods, not {total}")
        if (dataplane := node.dataplane_of("client")) != "ebpf":
            raise RuntimeError(f"the client is on {dataplane}: no BPF programs were built")
        pids = {p: pid_of(p) for p in PROCESSES}
        for index in range(options.rounds):
            if index:
                time.sleep(interval)
            options.progress(f"sample {index + 1}/{options.rounds}")
            for process, pid in pids.items():
                samples[process].append(sample(pid))
        llvm_in_agent = maps_llvm(pids["agent"])
        rules = int(agent.get("last_sync", {}).get("rules", 0))
    options.progress("one BPF build, for its peak memory")
    build_peak = bpf_build_peak_mb()
    return summarize(
        samples,
        pods=total,
        modelled=modelled,
        rules=rules,
        llvm_in_agent=llvm_in_agent,
        build_peak=build_peak,
        rounds=options.rounds,
    )


def summarize(
    samples: dict[str, list[Usage]],
    *,
    pods: int,
    modelled: int,
    rules: int,
    llvm_in_agent: bool,
    build_peak: float,
    rounds: int,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "scenario": "memory",
        "pods": pods,
        "modelled_pods": modelled,
        "policies": -(-modelled // PODS_PER_POLICY),
        "iptables_rules": rules,
        "agent_ebpf_datapath": True,
        "agent_maps_llvm": llvm_in_agent,
        "bpf_build_peak_rss_mb": build_peak,
        "rounds": rounds,
        "max": {},
    }
    for process in PROCESSES:
        usage = samples[process]
        rss = [u.rss for u in usage]
        pss = [u.pss for u in usage if u.pss is not None]
        result[f"{process}_rss_mb"] = statistics.median(rss)
        result[f"{process}_pss_mb"] = statistics.median(pss) if pss else None
        result[f"{process}_peak_rss_mb"] = max(u.peak for u in usage)
        result["max"][f"{process}_rss_mb"] = max(rss)
        result["max"][f"{process}_pss_mb"] = max(pss) if pss else None
    result["targets"] = {
        f"{process}_rss_mb <= {bound:.0f}": result[f"{process}_rss_mb"] <= bound
        for process, bound in TARGETS_MB.items()
    }
    return result


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['pods']} pods ({result['modelled_pods']} modelled), {result['policies']} "
        f"policies, {result['iptables_rules']} iptables rules; eBPF datapath on; LLVM in "
        f"the agent: {'yes' if result['agent_maps_llvm'] else 'no'}; BPF build child peak "
        f"RSS (while it runs): {result['bpf_build_peak_rss_mb']:.0f} MiB",
        f"{'process':<8} {'RSS MiB':>8} {'max':>7} {'PSS MiB':>8} {'max':>7} {'peak RSS':>9}",
    ]
    for process in PROCESSES:
        rss, pss = f"{process}_rss_mb", f"{process}_pss_mb"
        lines.append(
            f"{process:<8} {_mb(result[rss]):>8} {_mb(result['max'][rss]):>7} "
            f"{_mb(result[pss]):>8} {_mb(result['max'][pss]):>7} "
            f"{_mb(result[f'{process}_peak_rss_mb']):>9}"
        )
    lines += [
        f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in result["targets"].items()
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axes = new_figure(1)
    width = 0.27
    for offset, (measure, label) in enumerate(
        (("rss", "RSS"), ("pss", "PSS"), ("peak_rss", "peak RSS")), start=-1
    ):
        values = [result[f"{p}_{measure}_mb"] or 0.0 for p in PROCESSES]
        axes.bar([i + offset * width for i in range(len(PROCESSES))], values, width, label=label)
    for index, process in enumerate(PROCESSES):
        axes.hlines(TARGETS_MB[process], index - 1.5 * width, index + 1.5 * width, colors="black")
    axes.set_xticks(range(len(PROCESSES)), list(PROCESSES))
    axes.set(ylabel="MiB", title=f"{result['pods']} pods: memory (line: target)")
    axes.legend()
    save(figure, path)
