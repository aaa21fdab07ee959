"""`steer bench churn`: memory and latency while policies and pods change without pause.

A local node with 1,000 pods (the lab's real three, the rest modelled as in `steer bench
memory`), one policy per ten pods, and real traffic: the client pod keeps a keep-alive
HTTP connection to web busy through the node's Envoy, and opens a new connection every few
requests. For `minutes`, at least CHANGES_PER_S changes a second, alternately:
  - a policy edit: one group's policy file (one file per policy) is rewritten with
    another HTTP path;
  - a pod change: one modelled pod moves to another group (the lab state is rewritten).

For each change: the time from the write until the agent and the control plane have both
loaded inputs at least that new, the control plane's policy digest is the directory's, and
Envoy has acknowledged everything sent (change-to-enforcement; polled every 5 ms). A change
that is not enforced by the next slot delays that slot: `changes` counts what was made.
Every second: the RSS of the agent and the control plane (VmRSS); and the agent's CPU time
(utime + stime), for its busy time per change. Before the clock starts, every pod and every
policy is changed once (see `_warm_up`); the RSS slope is a least-squares fit over the
samples after the first fifth of the run, given in MiB per 10 minutes.

Targets: RSS slope <= 1 MiB per 10 minutes after warm-up, p99 change-to-enforcement <= 200 ms.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.atomicfile import write_json_atomic
from steer.bench import BenchOptions
from steer.bench.memory import (
    PODS_PER_POLICY,
    modelled_pods,
    pid_of,
    policies,
    processes_cpu_usec,
)
from steer.bench.plots import new_figure, save
from steer.constants import AGENT_STATUS_FILE, CONTROL_STATUS_FILE, LAB_STATE_FILE
from steer.lab.localnode import LocalNode, envoy_has_current, read_status, wait_for
from steer.lab.podproc import PodProcess, PodProcessError
from steer.lab.spec import LabPodJSON, LabStateJSON, default_lab_specs
from steer.source.local import directory_texts, texts_digest

PODS = 1000
QUICK_PODS = 40
MINUTES = 10.0
QUICK_MINUTES = 0.25
CHANGES_PER_S = 5.0
SAMPLE_EVERY_S = 1.0
POLL_S = 0.005
ENFORCE_TIMEOUT_S = 5.0
WARM_UP_FRACTION = 0.2
HTTP_PORT = 8080
# The traffic: requests per new connection, and the pause between requests.
REQUESTS_PER_CONNECTION = 20
REQUEST_PAUSE_S = 0.01
TARGET_SLOPE_MB_PER_10_MIN = 1.0
TARGET_P99_MS = 200.0
PROCESSES = ("agent", "control")
WEB_POLICY = (
    "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
    "metadata: {name: web, namespace: default}\n"
    "spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n    rules:\n"
    "      - from: [{podSelector: {matchLabels: {app: client}}}]\n"
    "        ports: [{port: 8080}]\n        http: {paths: [{prefix: /}]}\n"
)


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PROCESSES})
    agent_cpu_s: list[float] = field(default_factory=list)
    # Per enforced change: the agent's last sync by phase, and the control plane's last
    # reload (load, render, snapshot), in ms.
    agent_phases_ms: list[dict[str, float]] = field(default_factory=list)
    control_render_ms: list[float] = field(default_factory=list)

    def note_sync(self) -> None:
        agent, control = read_status(AGENT_STATUS_FILE), read_status(CONTROL_STATUS_FILE)
        if agent is not None:
            self.agent_phases_ms.append(agent.get("last_sync", {}).get("phases_ms", {}))
        if control is not None:
            self.control_render_ms.append(float(control.get("render_ms", 0.0)))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_mb_per_10_min(times: list[float], values: list[float]) -> float:
    """Least-squares slope of `values` over `times` (seconds), per 10 minutes."""
    if len(times) < 2:
        return 0.0
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return 0.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / spread
    return slope * 600.0


class StatusReader:
    """The agent's and control plane's status documents, parsed again only when their file
    was replaced: polled every 5 ms, parsing the agent's (1k pods) and hashing a hundred
    policy files each time took a good part of a core from the processes measured."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int], dict[str, Any] | None]] = {}

    def read(self, path: Path) -> dict[str, Any] | None:
        try:
            info = path.stat()
        except OSError:
            return None
        stamp = (info.st_ino, info.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is None or seen[0] != stamp:
            seen = (stamp, read_status(path))
            self._seen[path] = seen
        return seen[1]

    def enforced(self, since: float, want: str) -> bool:
        """Agent and control plane have loaded inputs at least as new as `since`, run the
        policies whose digest is `want`, and Envoy has acknowledged the current snapshot."""
        agent, control = self.read(AGENT_STATUS_FILE), self.read(CONTROL_STATUS_FILE)
        if agent is None or control is None:
            return False
        return (
            agent.get("loaded_at", 0) >= since
            and control.get("loaded_at", 0) >= since
            and agent.get("policy_digest") == want
            and control.get("policy_digest") == want
            and envoy_has_current(control)
        )


def _traffic(node: LocalNode, stop: threading.Event, counts: dict[str, int]) -> None:
    client, web = node.lab.pod("default", "client"), node.lab.pod("default", "web")
    with (
        PodProcess.start(web.netns, web.cgroup) as server,
        PodProcess.start(client.netns, client.cgroup) as worker,
    ):
        server.serve_http(web.ip, HTTP_PORT, "web")
        while not stop.is_set():
            try:
                conn = worker.http_open(node.ip("web"), HTTP_PORT)
                for _ in range(REQUESTS_PER_CONNECTION):
                    if stop.is_set():
                        break
                    reply = worker.http_request(conn, "GET", "/churn")
                    counts["ok" if reply.status == 200 else "other"] += 1
                    time.sleep(REQUEST_PAUSE_S)
                worker.http_close(conn)
            except PodProcessError:
                counts["failed"] += 1
                time.sleep(0.1)


def _sampler(pids: dict[str, int], samples: Samples, stop: threading.Event, started: float) -> None:
    while not stop.wait(SAMPLE_EVERY_S):
        samples.times.append(time.monotonic() - started)
        for process, pid in pids.items():
            samples.rss[process].append(_rss_mb(pid))
        samples.agent_cpu_s.append(sum(processes_cpu_usec([pids["agent"]])) / 1e6)


def run(options: BenchOptions) -> dict[str, Any]:
    total = QUICK_PODS if options.quick else PODS
    minutes = QUICK_MINUTES if options.quick else MINUTES
    specs = default_lab_specs()
    modelled = total - len(specs)
    groups = -(-modelled // PODS_PER_POLICY)
    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {"policy": [], "pod": []}
    counts = {"ok": 0, "other": 0, "failed": 0}
    samples = Samples()
    with LocalNode.start(specs=specs, policies={"web.yaml": WEB_POLICY}) as node:
        options.progress(f"adding {modelled} modelled pods and {groups} policies")
        state = node.lab.to_json()
        pods = modelled_pods(modelled)
        state["pods"] += pods
        write_json_atomic(LAB_STATE_FILE, state)
        node.write_policies({"web.yaml": WEB_POLICY, **group_files(policies(modelled))})
        node.wait_synced(timeout=180)
        options.progress("warm-up: every pod and every policy changed once")
        _warm_up(node, state, pods, groups)
        pids = {p: pid_of(p) for p in PROCESSES}
        stop = threading.Event()
        traffic = threading.Thread(target=_traffic, args=(node, stop, counts), daemon=True)
        traffic.start()
        # The clock starts once requests flow: starting the pods' workers and the server
        # took seconds of a quick run on a cold machine, which then counted no request.
        wait_for(lambda: counts["ok"] > 0, 60, "the live traffic to get through")
        counts.update(dict.fromkeys(counts, 0))
        started = time.monotonic()
        sampler = threading.Thread(
            target=_sampler, args=(pids, samples, stop, started), daemon=True
        )
        sampler.start()
        threads = [traffic, sampler]
        changes = 0
        status = StatusReader()
        deadline = started + minutes * 60
        slot = 1.0 / CHANGES_PER_S
        try:
            while time.monotonic() < deadline:
                slot_start = time.monotonic()
                write = _policy_change if changes % 2 == 0 else _pod_change
                since = time.time()
                write(node, changes, state, pods, groups)
                changes += 1
                latencies.append(_wait(node, since, status))
                by_kind[write.__name__.strip("_").removesuffix("_change")].append(latencies[-1])
                samples.note_sync()
                options.progress(
                    f"{changes} changes, last {latencies[-1]:.0f} ms, "
                    f"{(deadline - time.monotonic()) / 60:.1f} min left"
                )
                time.sleep(max(0.0, slot - (time.monotonic() - slot_start)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
        elapsed = time.monotonic() - started
        collections = {
            p: (read_status(f) or {}).get("gc", {})
            for p, f in (("agent", AGENT_STATUS_FILE), ("control", CONTROL_STATUS_FILE))
        }
    result = summarize(samples, latencies, counts, pods=total, minutes=elapsed / 60)
    result["rounds"] = options.rounds
    result["by_kind"] = {kind: _percentiles(values) for kind, values in by_kind.items()}
    # Full garbage collections (between changes, never inside one) and the last one's cost.
    result["gc"] = collections
    return result


def _warm_up(node: LocalNode, state: LabStateJSON, pods: list[LabPodJSON], groups: int) -> None:
    """Every pod moved to another group and every policy edited, once, in one batch each:
    the node then holds what a node that has lived holds. Without it the first pass of the
    churn over the 1k pods (~7 minutes at 5 changes/s, half of them pod changes) showed as
    memory growth: each object replaced for the first time lands elsewhere in the heap than
    the one built at start-up, which the allocator cannot hand back; after one pass the
    agent's RSS is flat (85.1 MiB over 2,000 further pod changes, in-process)."""
    for pod in pods:
        pod["labels"]["group"] = f"g{(int(pod['labels']['group'][1:]) + 1) % groups}"
    write_json_atomic(LAB_STATE_FILE, state)
    files = group_files(policies(groups * PODS_PER_POLICY))
    node.write_policies(
        {
            name: text.replace("exact: /healthz", "exact: /healthz-warm")
            for name, text in files.items()
        },
        replace=False,
    )
    node.wait_synced(timeout=180)


def _wait(node: LocalNode, since: float, status: StatusReader) -> float:
    """Milliseconds until the change written at `since` is enforced (ENFORCE_TIMEOUT_S at
    most)."""
    started = time.monotonic()
    want = texts_digest(directory_texts(node.policy_dir))
    while not status.enforced(since, want):
        if time.monotonic() - started > ENFORCE_TIMEOUT_S:
            break
        time.sleep(POLL_S)
    return (time.monotonic() - started) * 1000


def group_files(text: str) -> dict[str, str]:
    """One file per group's policy, as an operator keeps them (and as a cluster changes
    them: one object at a time)."""
    return {f"group-{i:04d}.yaml": doc for i, doc in enumerate(text.split("---\n"))}


def _policy_change(
    node: LocalNode, index: int, _state: LabStateJSON, _pods: Any, groups: int
) -> None:
    files = group_files(policies(groups * PODS_PER_POLICY))
    name = sorted(files)[(index // 2) % len(files)]
    text = files[name].replace("exact: /healthz", f"exact: /healthz-{index}")
    node.write_policies({name: text}, replace=False)


def _pod_change(
    _node: LocalNode, index: int, state: LabStateJSON, pods: list[LabPodJSON], groups: int
) -> None:
    pod = pods[(index // 2) % len(pods)]
    pod["labels"]["group"] = f"g{(index // 2) % groups}"
    write_json_atomic(LAB_STATE_FILE, state)


def summarize(
    samples: Samples,
    latencies: list[float],
    counts: dict[str, int],
    *,
    pods: int,
    minutes: float,
) -> dict[str, Any]:
    warm = int(len(samples.times) * WARM_UP_FRACTION)
    after = slice(warm, None)
    slopes = {
        p: slope_mb_per_10_min(samples.times[after], samples.rss[p][after]) for p in PROCESSES
    }
    cpu = samples.agent_cpu_s
    busy_ms = (cpu[-1] - cpu[0]) * 1000 / len(latencies) if len(cpu) > 1 and latencies else 0.0
    result: dict[str, Any] = {
        "scenario": "churn",
        "pods": pods,
        "minutes": minutes,
        **_percentiles(latencies),
        "changes_per_s": len(latencies) / (minutes * 60) if minutes else 0.0,
        "agent_busy_ms_per_change": busy_ms,
        "agent_phases_ms": _mean_phases(samples.agent_phases_ms),
        "control_render_ms": statistics.fmean(samples.control_render_ms)
        if samples.control_render_ms
        else 0.0,
        "requests": counts,
        "rss_series": {
            "seconds": samples.times,
            **{f"{p}_rss_mb": samples.rss[p] for p in PROCESSES},
        },
    }
    for process in PROCESSES:
        series = samples.rss[process]
        result[f"{process}_rss_mb_start"] = series[0] if series else 0.0
        result[f"{process}_rss_mb_end"] = series[-1] if series else 0.0
        result[f"{process}_rss_slope_mb_per_10_min"] = slopes[process]
    result["targets"] = {
        f"rss slope <= {TARGET_SLOPE_MB_PER_10_MIN} MiB/10 min": all(
            s <= TARGET_SLOPE_MB_PER_10_MIN for s in slopes.values()
        ),
        f"p99 change-to-enforcement <= {TARGET_P99_MS:.0f} ms": result["p99_ms"] <= TARGET_P99_MS,
    }
    return result


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"changes": 0, "p50_ms": 0.0, "p99_ms": 0.0}
    return {
        "changes": len(ordered),
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def _mean_phases(syncs: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's mean over the syncs (a phase a sync skipped counts as 0 ms)."""
    names = sorted({name for sync in syncs for name in sync})
    return {n: statistics.fmean(s.get(n, 0.0) for s in syncs) for n in names} if syncs else {}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['pods']} pods, {result['minutes']:.1f} min, {result['changes']} changes "
        f"({result['changes_per_s']:.1f}/s); requests {result['requests']}",
        f"change-to-enforcement p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; "
        f"agent busy {result['agent_busy_ms_per_change']:.1f} ms per change",
        "agent sync by phase (mean ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.get("agent_phases_ms", {}).items()),
        f"control plane reload (mean): {result.get('control_render_ms', 0.0):.1f} ms",
        *(
            f"{kind} changes: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms"
            for kind, v in result.get("by_kind", {}).items()
        ),
    ]
    lines += [
        f"{p}: RSS {result[f'{p}_rss_mb_start']:.1f} -> {result[f'{p}_rss_mb_end']:.1f} MiB, "
        f"slope after warm-up {result[f'{p}_rss_slope_mb_per_10_min']:+.2f} MiB/10 min"
        for p in PROCESSES
    ]
    lines += [
        f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in result["targets"].items()
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axes = new_figure(1)
    series = result["rss_series"]
    for process in PROCESSES:
        axes.plot(series["seconds"], series[f"{process}_rss_mb"], label=process)
    axes.set_xlabel("seconds of churn")
    axes.set_ylabel("RSS (MiB)")
    axes.set_title(f"RSS under churn ({result['changes_per_s']:.1f} changes/s)")
    axes.legend()
    save(figure, path)
