"""`steer bench propagation`: how long a policy change takes to reach a live connection.

The node: the lab's real `client` and `web` pods carry the traffic; every other pod is
*modelled*, an entry appended to the lab state file with an address in 10.244.0.0/16 and
labels but no namespace, veth or cgroup. The control plane and the agent treat modelled
pods as steered pods of the node, so each one gets its own filter chains and route
configuration, exactly as a real pod would. Policies: one HTTPPolicy per 10 pods, the
rules split evenly between them (1,000 pods and 10,000 rules: 100 policies of 100 ingress
rules each). One rule in ten names another group's pods by selector and the rest name /32
CIDRs; every other rule is an HTTP rule. `web` is selected by a policy of its own whose
first rule admits the client on 8080 for the path it requests, so client -> web is always
an L7 flow through the node's Envoy.

The change: `web`'s policy file is rewritten atomically (LocalNode.write_policies), the
client rule's action alternating between Allow and Deny. Both versions keep the flow L7, so
the agent has nothing to revoke and the new verdict can only arrive through Envoy's route
configuration. From the write, requests go back to back on ONE keep-alive connection (its
source port is checked on every reply) until one shows the new verdict (200 from the web
server, or Envoy's 403). Each change is left to settle (agent synced, Envoy's ACK in)
before the next, so changes never overlap. One unmeasured change warms each node up.

Modes: each of SotW and delta ADS gets its own node (`LocalNode.start(ads=...)`); rounds
alternate the order (ABBA) and each round makes ceil(changes / rounds) changes.

Bytes per change are computed, not sniffed: the snapshots before and after one change are
rendered in this process with `steer.render.xds.render_resources` from the same policy
texts and the same lab pods the control plane reads, and the responses the ADS server
would send are built and serialized. SotW resends every resource of each changed type
(Envoy subscribes to every route its listeners name, so all of them); delta sends only the
resources whose version changed (plus the names of removed ones). gRPC and HTTP/2 framing
are not counted. The push and ACK counts per change are the control plane's own counters
(/run/steer/control-status.json), and the control plane's time per change is what it logs
for each snapshot it renders.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from steer.atomicfile import write_json_atomic
from steer.bench import BenchOptions
from steer.bench.plots import new_figure, save
from steer.bench.stats import abba
from steer.constants import (
    ANNOTATION_DATAPLANE,
    CONTROL_STATUS_FILE,
    LAB_POD_CIDR,
    LAB_STATE_FILE,
    LOG_DIR,
)
from steer.control.cache import Snapshot
from steer.lab.localnode import LocalNode, read_status
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPodSpec
from steer.model.enforce import resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.render.xds import ROUTE_TYPE, render_resources
from steer.source.local import load_lab_pods

MODES = ("sotw", "delta")
PORT = 8080
PATH = "/hello"
WEB_FILE = "web.yaml"
NAMESPACE = "default"
GROUP_LABEL = "group"
PODS_PER_POLICY = 10
# One rule in this many names pods by selector, as real rules mostly do; the rest name CIDRs.
SELECTOR_EVERY = 10
TARGET_P99_MS = 100.0
# For each pod on eBPF the agent re-renders a per-destination policy on every change (about
# 20 s of CPU per pod at 1k pods). That is not the path under test and would compete with it
# for the CPU, so the real pods stay on iptables; the flow is L7 either way.
REAL_PODS_DATAPLANE = "iptables"
# The lab numbers its real pods from 10.244.0.2 up; modelled pods start well clear of them.
MODELLED_BASE = IPv4Address("10.244.16.0")
# A first sync at 1k pods and 10k rules parses every policy and applies ~200k iptables
# rules: 20-60 s on a 2-core machine, far past LocalNode.start's own 15 s.
SETUP_TIMEOUT_S = 900.0
SETTLE_TIMEOUT_S = 300.0
CHANGE_TIMEOUT_S = 120.0
# The control plane's log line for each snapshot it installs: when (the end of its work,
# to the millisecond, local time) and how long rendering it took.
_RENDERED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO snapshot for \S+ "
    r"rendered in ([\d.]+) ms",
    re.MULTILINE,
)


# --- synthetic pods and policies (shared with steer.bench.l7rules) ---------------------------


def modelled_pod(index: int, labels: Mapping[str, str]) -> dict[str, Any]:
    """A lab state entry for a pod that exists only there: the control plane and the agent
    steer it like any pod, and with no netns, veth or cgroup nothing runs in it."""
    ip = MODELLED_BASE + index
    if ip not in IPv4Network(LAB_POD_CIDR):
        raise ValueError(f"modelled pod {index} would fall outside {LAB_POD_CIDR}")
    # Empty handles rather than absent ones, so `steer lab status` can still read the file.
    return {
        "name": f"m{index}",
        "namespace": NAMESPACE,
        "ip": str(ip),
        "labels": dict(labels),
        "annotations": {},
        "namespace_labels": {},
        "netns": "",
        "veth": "",
        "cgroup": "",
    }


def add_modelled_pods(entries: Sequence[Mapping[str, Any]], state: Path = LAB_STATE_FILE) -> None:
    """Append `entries` to the lab state, atomically (the control plane and agent watch it
    and must never read half a file). Replaces modelled pods added before."""
    document = json.loads(state.read_text())
    document["pods"] = [p for p in document["pods"] if p.get("netns")] + list(entries)
    write_json_atomic(state, document)


def cidr_peer(n: int) -> str:
    """A distinct /32 outside the pod network for rule number `n`."""
    return f"{{cidr: 172.{16 + (n >> 16) % 16}.{(n >> 8) % 256}.{n % 256}/32}}"


def selector_peer(labels: Mapping[str, str]) -> str:
    pairs = ", ".join(f"{k}: {v}" for k, v in labels.items())
    return f"{{podSelector: {{matchLabels: {{{pairs}}}}}}}"


def rule_text(name: str, peer: str, port: int, path: str | None, action: str = "Allow") -> str:
    """One ingress rule; with `path` it is an HTTP rule (GET and that path prefix)."""
    http = f"\n        http: {{methods: [GET], paths: [{{prefix: {path}}}]}}" if path else ""
    return (
        f"      - name: {name}\n        action: {action}\n        from: [{peer}]\n"
        f"        ports: [{{port: {port}}}]{http}"
    )


def policy_text(name: str, selector: Mapping[str, str], rules: Sequence[str]) -> str:
    pairs = ", ".join(f"{k}: {v}" for k, v in selector.items())
    return (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: {name}, namespace: {NAMESPACE}}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{{pairs}}}}}\n"
        "  ingress:\n    defaultAction: Deny\n    rules:\n" + "\n".join(rules) + "\n"
    )


def real_pods(dataplane: str | None = None) -> list[LabPodSpec]:
    """`client` and `web`, both on `dataplane` if given (else each picks: auto)."""
    pinned = {} if dataplane is None else {ANNOTATION_DATAPLANE: dataplane}
    return [
        LabPodSpec(name, NAMESPACE, labels={"app": name}, annotations=pinned)
        for name in ("client", "web")
    ]


@contextmanager
def populated_node(
    specs: list[LabPodSpec],
    modelled: Sequence[Mapping[str, Any]],
    policies: Mapping[str, str],
    ads: str = "delta",
) -> Iterator[LocalNode]:
    """A local node whose lab state also lists `modelled`, running `policies`, synced.

    It starts with no policy, and gets the modelled pods and the policies only once it is
    up: that first sync may take far longer than LocalNode.start waits for.
    """
    with LocalNode.start(specs=specs, policies={}, ads=ads) as node:
        add_modelled_pods(modelled)
        node.write_policies(policies)
        node.wait_synced(SETUP_TIMEOUT_S)
        yield node


# --- this scenario's workload ----------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    pods: int
    rules: int
    changes: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(pods=50, rules=500, changes=5) if quick else cls(1000, 10_000, 50)

    @property
    def policies(self) -> int:
        return max(2, self.pods // PODS_PER_POLICY)

    @property
    def rules_per_policy(self) -> int:
        return max(1, self.rules // self.policies)


@dataclass(frozen=True)
class Workload:
    modelled: list[dict[str, Any]]
    # file name -> text; web's policy in its allowing version
    policies: dict[str, str]
    # allowing? -> web's policy file
    web: dict[bool, str]


def _client_rule(allowing: bool) -> str:
    return rule_text(
        "client-hello",
        selector_peer({"app": "client"}),
        PORT,
        PATH,
        action="Allow" if allowing else "Deny",
    )


def workload(sizes: Sizes) -> Workload:
    groups = sizes.policies - 1  # the last policy is web's own
    modelled = [
        modelled_pod(i, {"app": f"m{i}", GROUP_LABEL: f"g{i % groups}"})
        for i in range(sizes.pods - len(real_pods()))
    ]
    numbers = itertools.count()

    def filler(position: int, neighbour: int | None) -> str:
        n = next(numbers)
        peer = (
            selector_peer({GROUP_LABEL: f"g{neighbour}"})
            if neighbour is not None and position % SELECTOR_EVERY == 0
            else cidr_peer(n)
        )
        path = f"/r{n}/" if position % 2 else None
        return rule_text(f"r{n:05d}", peer, 8000 + position % 100, path)

    policies = {
        f"group-{g}.yaml": policy_text(
            f"group-{g}",
            {GROUP_LABEL: f"g{g}"},
            [filler(r, (g + 1) % groups) for r in range(sizes.rules_per_policy)],
        )
        for g in range(groups)
    }
    web_rules = [filler(r, None) for r in range(1, sizes.rules_per_policy)]
    web = {
        allowing: policy_text("web", {"app": "web"}, [_client_rule(allowing), *web_rules])
        for allowing in (True, False)
    }
    return Workload(modelled, {**policies, WEB_FILE: web[True]}, web)


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    written_at: float  # wall clock, to line up with the control plane's log
    seen_at: float
    latency_ms: float  # from the write to the first reply with the new verdict


@dataclass(frozen=True)
class Render:
    done_at: float
    took_ms: float


@dataclass
class ModeRun:
    changes: list[Change]
    renders: list[Render]
    pushes: int
    acks: int
    nacks: int
    pods: list[Pod]
    client_dataplane: str


def _counters() -> dict[str, int]:
    status = read_status(CONTROL_STATUS_FILE) or {}
    return {k: int(status.get(k, 0)) for k in ("pushes", "acks", "nacks")}


class _Flipper:
    """Flips web's policy and times it on one keep-alive connection."""

    def __init__(self, node: LocalNode, client: PodProcess, work: Workload) -> None:
        self.node, self.client, self.work = node, client, work
        self.conn = client.http_open(node.ip("web"), PORT, timeout=10.0)
        first = client.http_request(self.conn, "GET", PATH)
        if first.status != 200:
            raise RuntimeError(f"client -> web {PATH} answered {first.status} before any change")
        self.local_port = first.local_port
        self.allowing = True

    def flip(self) -> Change:
        self.allowing = not self.allowing
        want, old = (200, 403) if self.allowing else (403, 200)
        text = self.work.web[self.allowing]
        written_at, started = time.time(), time.perf_counter()
        self.node.write_policies({WEB_FILE: text}, replace=False)
        while True:
            reply = self.client.http_request(self.conn, "GET", PATH)
            if reply.local_port != self.local_port:
                raise RuntimeError("the keep-alive connection was replaced mid-run")
            if reply.status == want:
                break
            if reply.status != old:
                raise RuntimeError(f"expected {old} or {want}, got {reply.status}")
            if time.perf_counter() - started > CHANGE_TIMEOUT_S:
                raise TimeoutError(f"no {want} within {CHANGE_TIMEOUT_S:.0f}s of the change")
        change = Change(written_at, time.time(), (time.perf_counter() - started) * 1000)
        # Settled (agent done, ACK in) before the next change, so changes never overlap.
        self.node.wait_synced(SETTLE_TIMEOUT_S)
        return change


def _logged_renders(log: Path, offset: int) -> list[Render]:
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    return [
        Render(datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), float(m[2]))
        for m in _RENDERED.finditer(text)
    ]


def run_mode(mode: str, work: Workload, changes: int) -> ModeRun:
    with (
        populated_node(
            real_pods(REAL_PODS_DATAPLANE), work.modelled, work.policies, ads=mode
        ) as node,
        ExitStack() as stack,
    ):
        web, client_pod = node.lab.pod(NAMESPACE, "web"), node.lab.pod(NAMESPACE, "client")
        server = stack.enter_context(PodProcess.start(web.netns, web.cgroup))
        server.serve_http(web.ip, PORT, "web")
        client = stack.enter_context(PodProcess.start(client_pod.netns, client_pod.cgroup))
        flipper = _Flipper(node, client, work)
        flipper.flip()  # warm-up: first-use costs of a fresh node are not propagation
        log = LOG_DIR / "control.log"
        offset = log.stat().st_size
        before = _counters()
        measured = [flipper.flip() for _ in range(changes)]
        after = _counters()
        return ModeRun(
            changes=measured,
            renders=_logged_renders(log, offset),
            pushes=after["pushes"] - before["pushes"],
            acks=after["acks"] - before["acks"],
            nacks=after["nacks"] - before["nacks"],
            pods=load_lab_pods(LAB_STATE_FILE),
            client_dataplane=node.dataplane_of("client"),
        )


# --- bytes per change, computed --------------------------------------------------------------


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def push_bytes(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Serialized size of the ADS responses that take a node from `before` to `after`."""
    sotw = delta = changed = 0
    types = []
    for type_url in sorted(set(before.resources) | set(after.resources)):
        if before.version(type_url) == after.version(type_url):
            continue
        types.append(type_url.rsplit(".", 1)[-1])
        resources = after.get(type_url)
        old, new = before.resource_versions(type_url), after.resource_versions(type_url)
        updated = sorted(name for name, version in new.items() if old.get(name) != version)
        changed += len(updated)
        sotw += discovery_pb2.DiscoveryResponse(
            version_info=after.version(type_url),
            type_url=type_url,
            resources=[_pack(resources[name]) for name in sorted(resources)],
            nonce="1",
        ).ByteSize()
        delta += discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=after.version(type_url),
            type_url=type_url,
            resources=[
                discovery_pb2.Resource(
                    name=name, version=new[name], resource=_pack(resources[name])
                )
                for name in updated
            ],
            removed_resources=sorted(set(old) - set(new)),
            nonce="1",
        ).ByteSize()
    return {"sotw": sotw, "delta": delta, "types": types, "resources": changed}


def _parsed(text: str, source: str) -> list[HTTPPolicy]:
    policies, errors = parse_policies(text, source)
    if errors:
        raise ValueError("; ".join(str(e) for e in errors))
    return policies


def change_cost(work: Workload, pods: Sequence[Pod]) -> dict[str, Any]:
    """Bytes per change (mean of the two directions) and the in-process render time of one
    snapshot (resolve, render, versions: the control plane's work minus file I/O)."""
    others = [
        p for name, text in work.policies.items() if name != WEB_FILE for p in _parsed(text, name)
    ]
    snapshots: dict[bool, Snapshot] = {}
    render_ms = []
    for allowing, text in work.web.items():
        policies = [*others, *_parsed(text, WEB_FILE)]
        started = time.perf_counter()
        snapshot = Snapshot(render_resources(resolve(policies, pods)))
        snapshot.check_consistency()
        for type_url in snapshot.resources:
            snapshot.resource_versions(type_url)
            snapshot.version(type_url)
        render_ms.append((time.perf_counter() - started) * 1000)
        snapshots[allowing] = snapshot
    costs = [push_bytes(snapshots[a], snapshots[not a]) for a in (True, False)]
    return {
        "bytes": {m: statistics.fmean(c[m] for c in costs) for m in MODES},
        "changed_types": costs[0]["types"],
        "changed_resources": costs[0]["resources"],
        "route_configurations": len(snapshots[True].get(ROUTE_TYPE)),
        "render_ms": statistics.median(render_ms),
    }


# --- the scenario ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


BREAKDOWN = ("notice", "render", "push_apply")


def breakdown(changes: Sequence[Change], renders: Sequence[Render]) -> dict[str, list[float]]:
    """Where each change's time went, from the control plane's log: noticing the file
    (write -> render start), rendering, and the rest (push, Envoy applying it, the next
    request). Empty if the log does not have exactly one render per change to pair."""
    parts: dict[str, list[float]] = {part: [] for part in BREAKDOWN}
    if len(changes) != len(renders):
        return parts
    for change, render in zip(changes, renders, strict=True):
        parts["notice"].append((render.done_at - change.written_at) * 1000 - render.took_ms)
        parts["render"].append(render.took_ms)
        parts["push_apply"].append((change.seen_at - render.done_at) * 1000)
    return parts


def _mode_summary(runs: list[ModeRun]) -> dict[str, Any]:
    latencies = [c.latency_ms for r in runs for c in r.changes]
    changes = len(latencies)
    # Paired per run: the log and the changes of one node line up, not across nodes.
    splits = [breakdown(r.changes, r.renders) for r in runs]
    pooled = {part: [x for split in splits for x in split[part]] for part in BREAKDOWN}
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 99),
        "min_ms": min(latencies),
        "max_ms": max(latencies),
        "round_p50_ms": [statistics.median(c.latency_ms for c in r.changes) for r in runs],
        "latencies_ms": latencies,
        "breakdown_p50_ms": {
            part: statistics.median(values) if values else None for part, values in pooled.items()
        },
        "breakdown_changes": len(pooled["render"]),
        # Per change, in the order of latencies_ms, to see where a slow one spent its time.
        "breakdown_ms": pooled,
        "pushes_per_change": sum(r.pushes for r in runs) / changes,
        "acks_per_change": sum(r.acks for r in runs) / changes,
        "nacks": sum(r.nacks for r in runs),
        "changes": changes,
        "p99_target_met": percentile(latencies, 99) <= TARGET_P99_MS,
    }


def run(options: BenchOptions) -> dict[str, Any]:
    sizes = Sizes.of(options.quick)
    work = workload(sizes)
    per_round = math.ceil(sizes.changes / options.rounds)
    runs: dict[str, list[ModeRun]] = {mode: [] for mode in MODES}
    order = list(abba(MODES, options.rounds))
    for step, mode in enumerate(order, 1):
        options.progress(f"[{step}/{len(order)}] {mode}: {per_round} changes")
        runs[mode].append(run_mode(mode, work, per_round))
    options.progress("computing bytes per change")
    last = runs[MODES[0]][-1]
    cost = change_cost(work, last.pods)
    modes = {mode: _mode_summary(runs[mode]) for mode in MODES}
    return {
        "scenario": "propagation",
        "pods": sizes.pods,
        "rules": sizes.policies * sizes.rules_per_policy,
        "policies": sizes.policies,
        "rounds": options.rounds,
        "changes": per_round * options.rounds,
        "mode": modes,
        "p50_ms": {mode: modes[mode]["p50_ms"] for mode in MODES},
        "p99_ms": {mode: modes[mode]["p99_ms"] for mode in MODES},
        "bytes_per_change": cost["bytes"],
        "bytes_detail": {
            "changed_types": cost["changed_types"],
            "changed_resources": cost["changed_resources"],
            "route_configurations": cost["route_configurations"],
        },
        "render_in_process_ms": cost["render_ms"],
        "target_p99_ms": TARGET_P99_MS,
        "client_dataplane": last.client_dataplane,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['pods']} pods, {result['rules']} rules in {result['policies']} policies; "
        f"{result['changes']} changes per mode over {result['rounds']} rounds "
        f"(real pods on {result['client_dataplane']})",
        f"{'mode':<6} {'p50 ms':>8} {'p99 ms':>8} {'min':>8} {'max':>8}  "
        f"{'notice':>6} {'render':>6} {'push+apply':>10}  {'pushes':>6} {'bytes/change':>13}",
    ]
    for mode, figures in result["mode"].items():
        split = figures["breakdown_p50_ms"]
        lines.append(
            f"{mode:<6} {figures['p50_ms']:>8.1f} {figures['p99_ms']:>8.1f} "
            f"{figures['min_ms']:>8.1f} {figures['max_ms']:>8.1f}  "
            f"{_ms(split['notice']):>6} {_ms(split['render']):>6} "
            f"{_ms(split['push_apply']):>10}  "
            f"{figures['pushes_per_change']:>6.1f} {result['bytes_per_change'][mode]:>13,.0f}"
        )
    detail = result["bytes_detail"]
    lines += [
        "notice / render / push+apply: p50 ms of each change's time before the control plane "
        "starts rendering, rendering (its own log), and after it until the new verdict",
        f"a change moves {detail['changed_resources']} of {detail['route_configurations']} "
        f"route configurations ({', '.join(detail['changed_types'])}); bytes are computed "
        "from an in-process render of the same inputs "
        f"(resolve + render + versions there: {result['render_in_process_ms']:.0f} ms)",
    ]
    lines += [
        f"target p99 <= {result['target_p99_ms']:.0f} ms, {mode}: "
        f"{'met' if figures['p99_target_met'] else 'NOT met'}"
        for mode, figures in result["mode"].items()
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, (left, right) = new_figure(2)
    modes = list(result["mode"])
    left.boxplot([result["mode"][m]["latencies_ms"] for m in modes], tick_labels=modes)
    left.axhline(result["target_p99_ms"], linestyle="--", color="grey", label="p99 target")
    left.set(
        ylabel="ms",
        title=f"policy change -> new verdict ({result['pods']} pods, {result['rules']} rules)",
    )
    left.legend()
    right.bar(modes, [result["bytes_per_change"][m] for m in modes])
    right.set(ylabel="bytes (computed)", title="pushed per change", yscale="log")
    save(figure, path)
