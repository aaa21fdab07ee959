"""`steer bench faults`: what steer keeps while its own parts fail, under steady load.

On each datapath, a local node where the client pod keeps two kinds of traffic going, each
request on a connection that is reused for a few requests and then replaced:
  - L7: GET /ok to web:8080, which web's policy allows through Envoy;
  - L4 only: GET to api:7000, which api's policy allows with no HTTP rule (no Envoy).
Every response is classified: served (200) through Envoy, served directly, refused
(403, a reset, a refused or failed connect). A 200 for an L7 request that did not come
through Envoy is **unchecked**: it reached the backend without the check it was owed.

The drills, one after the other on the same node:
  - agent-kill: `kill -9` of the agent, a new agent started a second later. Nothing may
    fail (verdicts and steering live in the kernel); on eBPF the new agent must adopt the
    pinned programs rather than compile again (`adopted` in the drill).
  - envoy-kill: `kill -9` of Envoy (its supervisor restarts it). L7 requests fail closed
    while it is down (never unchecked); `recovery_s` is from Envoy's restart to the first
    L7 request served again. L4-only requests must not fail.
  - control-restart: `kill -9` of the control plane and a new one. Nothing may fail
    (Envoy keeps its configuration); `recovery_s` is from the restart until a policy
    change is enforced again (agent, control plane and Envoy in sync).
  - tighten: web's policy stops allowing /ok and api's stops allowing 7000, under load.
    `failed` counts requests served against the new rules after the revocation deadline
    (1 s from the change): it must be 0.

Per drill: requests sent during its window, failed (as defined per drill), unchecked, and
recovery_s where it applies. Figures are measured, never asserted in tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from steer.bench import BenchOptions
from steer.bench.memory import pid_of
from steer.bench.plots import new_figure, save
from steer.constants import (
    ANNOTATION_DATAPLANE,
    LAB_GATEWAY_IP,
    LOG_DIR,
    NODE_NETNS,
    POLICY_DIR,
)
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess, PodProcessError
from steer.lab.process import supervised
from steer.lab.servers import answered_from
from steer.lab.spec import default_lab_specs

DATAPLANES = ("iptables", "ebpf")
DRILLS = ("agent-kill", "envoy-kill", "control-restart", "tighten")
WEB_PORT, API_PORT = 8080, 7000
REQUESTS_PER_CONNECTION = 10
PAUSE_S = 0.005
REVOCATION_DEADLINE_S = 1.0
RECOVERY_TIMEOUT_S = 20.0
WINDOW_S = {True: 2.0, False: 5.0}  # quick, full: load before and after each fault


def _policy(app: str, rules: str) -> str:
    return (
        "apiVersion: steer.dev/v1alpha1\nkind: HTTPPolicy\n"
        f"metadata: {{name: {app}, namespace: default}}\n"
        f"spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n"
        f"    defaultAction: Deny\n    rules:\n{rules}"
    )


def policies(*, tightened: bool = False, marker: int = 0) -> dict[str, str]:
    client = "[{podSelector: {matchLabels: {app: client}}}]"
    web_path = "/nothing" if tightened else "/ok"
    api_port = 7999 if tightened else API_PORT
    return {
        "web.yaml": _policy(
            "web",
            f"      - from: {client}\n        ports: [{{port: {WEB_PORT}}}]\n"
            f"        http: {{paths: [{{prefix: {web_path}}}, {{exact: /marker-{marker}}}]}}\n",
        ),
        "api.yaml": _policy(
            "api", f"      - from: {client}\n        ports: [{{port: {api_port}}}]\n"
        ),
    }


@dataclass
class Outcome:
    at: float
    served: bool
    via_envoy: bool


@dataclass
class Load:
    """Requests of one kind, sent back to back from the client pod, outcomes kept."""

    worker: PodProcess
    ip: str
    port: int
    path: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = self.worker.http_open(self.ip, self.port, timeout=1.0)
            except PodProcessError:
                self.outcomes.append(Outcome(time.monotonic(), False, False))
                time.sleep(PAUSE_S)
                continue
            try:
                for _ in range(REQUESTS_PER_CONNECTION):
                    if self.stop.is_set():
                        break
                    reply = self.worker.http_request(conn, "GET", self.path)
                    via = answered_from(reply.body) == LAB_GATEWAY_IP
                    self.outcomes.append(Outcome(time.monotonic(), reply.status == 200, via))
                    time.sleep(PAUSE_S)
            except PodProcessError:
                self.outcomes.append(Outcome(time.monotonic(), False, False))
            finally:
                with suppress(PodProcessError):
                    self.worker.http_close(conn)

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.at < end]


@contextmanager
def loads(node: LocalNode) -> Iterator[tuple[Load, Load]]:
    client, web, api = (node.lab.pod("default", n) for n in ("client", "web", "api"))
    with ExitStack() as stack:
        for pod, port in ((web, WEB_PORT), (api, API_PORT)):
            server = stack.enter_context(PodProcess.start(pod.netns, pod.cgroup))
            server.serve_http(pod.ip, port, pod.name)
        l7 = Load(
            stack.enter_context(PodProcess.start(client.netns, client.cgroup)),
            web.ip,
            WEB_PORT,
            "/ok",
        )
        l4 = Load(
            stack.enter_context(PodProcess.start(client.netns, client.cgroup)),
            api.ip,
            API_PORT,
            "/",
        )
        threads = [threading.Thread(target=load.run, daemon=True) for load in (l7, l4)]
        for thread in threads:
            thread.start()
        try:
            yield l7, l4
        finally:
            for load in (l7, l4):
                load.stop.set()
            for thread in threads:
                thread.join(timeout=10)


def _restart(role: str, stack: ExitStack) -> None:
    """kill -9 this process's `steer <role>` child, and start a new one like it."""
    os.kill(pid_of(role), signal.SIGKILL)
    time.sleep(1.0)
    argv = [sys.executable, "-m", "steer.cli", role, "--policies", str(POLICY_DIR)]
    # In the node's namespace, as LocalNode starts it: `steer lab down` then reaches it too.
    stack.enter_context(supervised(argv, LOG_DIR / f"{role}-restarted.log", netns=NODE_NETNS))


def _envoy_pid() -> int:
    supervisor = pid_of("envoy")
    found = subprocess.run(
        ["pgrep", "-P", str(supervisor), "-x", "envoy"], capture_output=True, text=True, check=False
    ).stdout.split()
    if len(found) != 1:
        raise RuntimeError(f"expected one envoy under pid {supervisor}, found {found or 'none'}")
    return int(found[0])


def _wait_envoy_restarted(old: int) -> float:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if _envoy_pid() != old:
                return time.monotonic()
        except RuntimeError:
            pass
        time.sleep(0.02)
    raise RuntimeError("Envoy was not restarted by its supervisor")


def _first_served_after(load: Load, since: float) -> float | None:
    deadline = since + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        served = [o.at for o in load.between(since, time.monotonic() + 1) if o.served]
        if served:
            return served[0] - since
        time.sleep(0.02)
    return None


@dataclass
class Bench:
    """One node under load: the loads, the load window, processes restarted by drills."""

    dataplane: str
    node: LocalNode
    l7: Load
    l4: Load
    window: float
    restarted: ExitStack


def drill(name: str, bench: Bench) -> dict[str, Any]:
    dataplane, node, l7, l4 = bench.dataplane, bench.node, bench.l7, bench.l4
    window, stack = bench.window, bench.restarted
    start = time.monotonic()
    time.sleep(window)
    recovery: float | None = None
    adopted: bool | None = None
    failed_in: tuple[Load, ...] = (l7, l4)
    served_against: tuple[Load, ...] = ()
    deadline = start
    if name == "agent-kill":
        _restart("agent", stack)
        node.wait_synced(timeout=RECOVERY_TIMEOUT_S)
        log = (LOG_DIR / "agent-restarted.log").read_text(errors="replace")
        adopted = "adopted" in log if dataplane == "ebpf" else None
    elif name == "envoy-kill":
        old = _envoy_pid()
        os.kill(old, signal.SIGKILL)
        restarted = _wait_envoy_restarted(old)
        recovery = _first_served_after(l7, restarted)
        failed_in = (l4,)  # L7 fails closed while Envoy is down, by design
    elif name == "control-restart":
        _restart("control", stack)
        restarted = time.monotonic()
        node.write_policies(policies(marker=1))
        node.wait_synced(timeout=RECOVERY_TIMEOUT_S)
        recovery = time.monotonic() - restarted
    else:  # tighten
        node.write_policies(policies(tightened=True))
        deadline = time.monotonic() + REVOCATION_DEADLINE_S
        failed_in, served_against = (), (l7, l4)
    time.sleep(window)
    end = time.monotonic()
    everything = [o for load in (l7, l4) for o in load.between(start, end)]
    failed = sum(1 for load in failed_in for o in load.between(start, end) if not o.served)
    failed += sum(1 for load in served_against for o in load.between(deadline, end) if o.served)
    result: dict[str, Any] = {
        "name": name,
        "dataplane": dataplane,
        "requests": len(everything),
        "failed": failed,
        "unchecked": sum(1 for o in l7.between(start, end) if o.served and not o.via_envoy),
        "recovery_s": recovery,
    }
    if adopted is not None:
        result["adopted"] = adopted
    return result


def run(options: BenchOptions) -> dict[str, Any]:
    window = WINDOW_S[options.quick]
    results: list[dict[str, Any]] = []
    for dataplane in DATAPLANES:
        specs = [
            replace(s, annotations={ANNOTATION_DATAPLANE: dataplane}) for s in default_lab_specs()
        ]
        with LocalNode.start(specs=specs, policies=policies()) as node, ExitStack() as restarted:
            if (found := node.dataplane_of("client")) != dataplane:
                raise RuntimeError(f"the client is on {found}, not {dataplane}")
            with loads(node) as (l7, l4):
                for name in DRILLS:
                    options.progress(f"{dataplane}: {name}")
                    bench = Bench(dataplane, node, l7, l4, window, restarted)
                    results.append(drill(name, bench))
                    # Each drill starts from the node as it was.
                    node.write_policies(policies())
                    node.wait_synced(timeout=RECOVERY_TIMEOUT_S)
    return {"scenario": "faults", "rounds": options.rounds, "window_s": window, "drills": results}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'drill':<16} {'datapath':<9} {'requests':>8} {'failed':>7} {'unchecked':>9} "
        f"{'recovery s':>10}"
    ]
    for d in result["drills"]:
        recovery = "-" if d["recovery_s"] is None else f"{d['recovery_s']:.2f}"
        extra = "" if "adopted" not in d else f"  adopted pins: {'yes' if d['adopted'] else 'NO'}"
        lines.append(
            f"{d['name']:<16} {d['dataplane']:<9} {d['requests']:>8} {d['failed']:>7} "
            f"{d['unchecked']:>9} {recovery:>10}{extra}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axes = new_figure(1)
    drills = result["drills"]
    labels = [f"{d['name']}\n{d['dataplane']}" for d in drills]
    axes.bar(range(len(drills)), [d["failed"] for d in drills], label="failed")
    axes.bar(range(len(drills)), [d["unchecked"] for d in drills], label="unchecked", alpha=0.6)
    axes.set_xticks(range(len(drills)), labels, fontsize=7, rotation=45)
    axes.set_ylabel("requests")
    axes.set_title("fault drills under load")
    axes.legend()
    save(figure, path)
