"""`steer demo`: the whole local node, end to end, with checks a person can read.

It brings up a lab (client, web, api), the control plane, the agent and Envoy as separate
processes exactly as an operator would run them, loads the sample policies, and checks
what the product promises. Everything is torn down at the end unless --keep is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from steer.constants import (
    CGROUP_SUBTREE,
    LAB_STATE_FILE,
    NODE_NETNS,
    POD_NETNS_PREFIX,
)
from steer.localnode import LocalNode
from steer.node import iptables
from steer.node.lab import cgroup2_root
from steer.node.netns import run_in_netns
from steer.render.iptables import CHAIN_PRE
from steer.testing.servers import connect, http_connection, serve, time_connect

LIVE_CHANGE_BUDGET_MS = 100.0
TIGHTENED_WEB_RULE = """
      - name: hello-withdrawn
        action: Deny
        from:
          - podSelector:
              matchLabels:
                app: client
        ports:
          - port: 8080
        http:
          paths:
            - prefix: /public/hello
"""


@dataclass(frozen=True)
class Check:
    name: str
    dataplane: str
    ok: bool
    detail: str


@dataclass
class DemoResult:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        rows = [f"{'check':<{width}}  dataplane  result  detail"]
        rows += [
            f"{c.name:<{width}}  {c.dataplane:<9}  {'ok' if c.ok else 'FAIL':<6}  {c.detail}"
            for c in self.checks
        ]
        rows.append(f"\n{'all checks passed' if self.ok else 'SOME CHECKS FAILED'}")
        return "\n".join(rows)


class _Checks:
    def __init__(self, node: LocalNode, dataplane: str) -> None:
        self.node = node
        self.ns = node.netns
        self.ip = node.ip
        self.dataplane = dataplane
        self.results: list[Check] = []

    def run(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as exc:  # a check that crashes is a failed check, not a crash
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.results.append(Check(name, self.dataplane, ok, detail))

    def allowed_path(self) -> tuple[bool, str]:
        client = http_connection(self.ns("client"), self.ip("web"), 8080)
        try:
            status, body, _ = client.request("GET", "/public/hello")
        finally:
            client.close()
        served_by = json.loads(body).get("pod") if status == 200 else None
        return status == 200 and served_by == "web", f"GET /public/hello -> {status}"

    def denied_path(self) -> tuple[bool, str]:
        client = http_connection(self.ns("client"), self.ip("web"), 8080)
        outcomes = []
        try:
            for path in ("/admin", "/public/../admin", "//admin", "/public/..%2fadmin"):
                status, _, headers = client.request("GET", path)
                outcomes.append((path, status, headers.get("server", "")))
        finally:
            client.close()
        ok = all(status in (400, 403) and server == "envoy" for _, status, server in outcomes)
        ok = ok and outcomes[0][1] == 403
        return ok, ", ".join(f"{p} -> {s}" for p, s, _ in outcomes)

    def l4_denied(self) -> tuple[bool, str]:
        outcome, seconds = time_connect(self.ns("client"), self.ip("web"), 9090)
        return (
            outcome == "refused" and seconds < 1.0,
            f"connect web:9090 {outcome} after {seconds * 1000:.1f} ms",
        )

    def verdict_once(self) -> tuple[bool, str]:
        def counts() -> dict[str, int]:
            return {c.comment: c.packets for c in iptables.counters("mangle", CHAIN_PRE)}

        before = run_in_netns(NODE_NETNS, counts)
        messages = 200
        with connect(self.ns("client"), self.ip("api"), 7000) as sock:
            for i in range(messages):
                payload = f"{i:08d}".encode()
                sock.sendall(payload)
                received = b""
                while len(received) < len(payload):
                    received += sock.recv(64)
        after = run_in_netns(NODE_NETNS, counts)
        walked = after["policy-entry"] - before["policy-entry"]
        cached = after["verdict-cached"] - before["verdict-cached"]
        return (
            walked == 1 and cached >= messages,
            f"{messages} round trips: policy chain walked {walked}x, "
            f"connmark short-cut {cached} packets",
        )

    def live_change(self) -> tuple[bool, str]:
        client = http_connection(self.ns("client"), self.ip("web"), 8080)
        original = (self.node.policy_dir / "web.yaml").read_text()
        try:
            first, _, _ = client.request("GET", "/public/hello")
            if first != 200:
                return False, f"before the change: {first}"
            started = time.perf_counter()
            self.node.write_policies(
                {"web.yaml": original.rstrip("\n") + TIGHTENED_WEB_RULE}, replace=False
            )
            status, attempts = first, 0
            while status == 200 and time.perf_counter() - started < 5:
                status, _, _ = client.request("GET", "/public/hello")
                attempts += 1
            elapsed_ms = (time.perf_counter() - started) * 1000
        finally:
            client.close()
            self.node.write_policies({"web.yaml": original}, replace=False)
        return (
            status == 403 and elapsed_ms <= LIVE_CHANGE_BUDGET_MS,
            f"same keep-alive connection: 200 -> {status} {elapsed_ms:.1f} ms after the "
            f"policy file changed ({attempts} requests)",
        )


def leftovers() -> list[str]:
    found = []
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        found += [
            f"netns {n.name}"
            for n in netns_dir.iterdir()
            if n.name == NODE_NETNS or n.name.startswith(POD_NETNS_PREFIX)
        ]
    try:
        subtree = cgroup2_root() / CGROUP_SUBTREE
        if subtree.exists():
            found.append(f"cgroup {subtree}")
    except Exception:  # no cgroup2 at all: nothing of ours can be left there
        pass
    if LAB_STATE_FILE.exists():
        found.append(f"state {LAB_STATE_FILE}")
    return found


def run_demo(keep: bool = False, dataplane: str = "iptables", ads: str = "delta") -> DemoResult:
    checks: _Checks | None = None
    try:
        with LocalNode.start(ads=ads, keep=keep) as node, ExitStack() as servers:
            web, api = node.lab.pod("default", "web"), node.lab.pod("default", "api")
            servers.enter_context(serve(web.netns, web.ip, 8080, http=True, pod_name="web"))
            servers.enter_context(serve(web.netns, web.ip, 9090, http=False))
            servers.enter_context(serve(api.netns, api.ip, 7000, http=False))
            checks = _Checks(node, dataplane)
            checks.run("allowed-path-200", checks.allowed_path)
            checks.run("denied-path-403", checks.denied_path)
            checks.run("l4-deny-refused", checks.l4_denied)
            checks.run("verdict-once-per-flow", checks.verdict_once)
            checks.run("live-policy-change", checks.live_change)
    except Exception as exc:  # the node did not come up: report it as a failed check
        results = [] if checks is None else checks.results
        results.append(Check("node-up", dataplane, False, f"{type(exc).__name__}: {exc}"))
        return DemoResult(results)
    assert checks is not None
    if not keep:
        left = leftovers()
        checks.results.append(
            Check(
                "teardown-clean",
                dataplane,
                not left,
                "nothing left" if not left else "left behind: " + ", ".join(left),
            )
        )
    return DemoResult(checks.results)
