"""`steer demo`: the whole local node, end to end, with checks a person can read.

It brings up a lab (client, web, api), the control plane, the agent and Envoy as separate
processes exactly as an operator would run them, loads the sample policies, and checks
what the product promises, on the iptables datapath, the eBPF one, or both (the client pod
switching datapath half way). Everything is torn down at the end unless --keep is given.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

from steer.constants import (
    ANNOTATION_DATAPLANE,
    BPF_PIN_DIR,
    CGROUP_SUBTREE,
    LAB_STATE_FILE,
    NODE_NETNS,
    POD_NETNS_PREFIX,
    POLICY_DIR,
)
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess
from steer.lab.spec import default_lab_specs
from steer.model.explain import HTTPRequest, explain_pods
from steer.node import iptables
from steer.node.bpfobjects import BpfObjects
from steer.node.cgroups import cgroup2_root
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns
from steer.node.observe import one_line, read_events
from steer.render.iptables import CHAIN_DECIDE, CHAIN_PRE
from steer.source.local import LocalInputs

# What the next request on a live connection should wait for a policy change, at most.
# Reported, not judged: how long a change takes depends on the machine's load, which
# `steer bench propagation` measures over many changes; the check is that it happens.
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
    """The demo's checks, run from a worker process inside the client pod (in its netns
    and its cgroup, where the eBPF datapath's hooks act)."""

    def __init__(self, node: LocalNode, client: PodProcess) -> None:
        self.node = node
        self.client = client
        self.ip = node.ip
        self.dataplane = "iptables"
        self.results: list[Check] = []

    def run(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as exc:  # a check that crashes is a failed check, not a crash
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.results.append(Check(name, self.dataplane, ok, detail))

    def run_common(self) -> None:
        self.run("allowed-path-200", self.allowed_path)
        self.run("denied-path-403", self.denied_path)
        self.run("observe-names-the-rules", self.observed)
        self.run("explain-agrees", self.explained)
        self.run("l4-deny-refused", self.l4_denied)
        self.run("flow-events-name-the-process", self.flow_events)
        self.run("verdict-once-per-flow", self.verdict_once)
        self.run("l4-only-without-envoy", self.l4_only_direct)
        self.run("live-policy-change", self.live_change)

    def run_ebpf_only(self) -> None:
        self.run("skmsg-counters-grew", self.skmsg_counters)
        self.run("veth-carries-no-payload", self.veth_quiet)

    def allowed_path(self) -> tuple[bool, str]:
        reply = self.client.request(self.ip("web"), 8080, "GET", "/public/hello")
        served_by = json.loads(reply.body).get("pod") if reply.status == 200 else None
        return reply.status == 200 and served_by == "web", f"GET /public/hello -> {reply.status}"

    def denied_path(self) -> tuple[bool, str]:
        conn = self.client.http_open(self.ip("web"), 8080)
        outcomes = []
        try:
            for path in ("/admin", "/public/../admin", "//admin", "/public/..%2fadmin"):
                reply = self.client.http_request(conn, "GET", path)
                outcomes.append((path, reply.status, reply.headers.get("server", "")))
        finally:
            self.client.http_close(conn)
        ok = all(status in (400, 403) and server == "envoy" for _, status, server in outcomes)
        ok = ok and outcomes[0][1] == 403
        return ok, ", ".join(f"{p} -> {s}" for p, s, _ in outcomes)

    # The two requests above as `steer observe` must show them: (verdict, status, rule).
    OBSERVED: ClassVar[dict[str, tuple[str, int, str]]] = {
        "/public/hello": ("allowed", 200, "public-read"),
        "/admin": ("denied", 403, "default-deny"),
    }

    def observed(self) -> tuple[bool, str]:
        """The requests above, in `steer observe`: client, its datapath, web's policy and the
        deciding rule. The detail is the excerpt `steer observe` prints."""
        latest: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 5  # Envoy flushes its access log every 200 ms
        while len(latest) < len(self.OBSERVED) and time.monotonic() < deadline:
            for event in read_events(200):
                if event.get("dataplane") == self.dataplane and event.get("path") in self.OBSERVED:
                    latest[str(event["path"])] = event
            time.sleep(0.2)
        ok = len(latest) == len(self.OBSERVED) and all(
            (e["verdict"], e["status"], e["rule"], e["policy"], e["pod"])
            == (*self.OBSERVED[path], "default/web", "client")
            for path, e in latest.items()
        )
        return ok, " | ".join(one_line(e) for e in latest.values()) or "no events"

    def flow_events(self) -> tuple[bool, str]:
        """The connect to web:9090 refused above, as a flow event from the kernel's socket
        hooks (either datapath): the client worker's pid and comm, and the refusing rule."""
        target = f"{self.ip('web')}:9090"
        found: list[dict[str, object]] = []
        deadline = time.monotonic() + 5
        while not found and time.monotonic() < deadline:
            found = [
                e
                for e in read_events(1000)
                if e.get("layer") == "l4" and e.get("dst") == target and e["pid"] == self.client.pid
            ]
            time.sleep(0.2)
        if not found:
            return False, f"no flow event for {target}"
        event = found[-1]
        ok = (event["verdict"], event["end"], event["rule"]) == (
            "denied",
            "refused",
            "no-debug-port",
        )
        return ok, one_line(event)

    def explained(self) -> tuple[bool, str]:
        """`steer explain` predicts what the client got: 200, 403 and a refused connect."""
        policies, pods = LocalInputs(POLICY_DIR, LAB_STATE_FILE).load()
        cases = {("/public/hello", 8080): 200, ("/admin", 8080): 403, ("/", 9090): None}
        seen = []
        for (path, port), status in cases.items():
            result = explain_pods(
                policies.policies,
                pods,
                "default/client",
                ("default/web", port),
                HTTPRequest(path=path),
            )
            seen.append((f"{path}:{port}", result.status, result.rule))
            if result.status != status:
                return False, f"explain {path} on {port}: {result.to_json()}"
        return True, ", ".join(f"{w} -> {s or 'refused'} ({r})" for w, s, r in seen)

    def l4_denied(self) -> tuple[bool, str]:
        outcome, seconds = self.client.connect_outcome(self.ip("web"), 9090)
        return (
            outcome == "refused" and seconds < 1.0,
            f"connect web:9090 {outcome} after {seconds * 1000:.2f} ms",
        )

    def verdict_once(self) -> tuple[bool, str]:
        requests = 200
        before_ipt, before_bpf = _iptables_counts(), self._bpf_counts()
        conn = self.client.http_open(self.ip("api"), 7000)
        try:
            statuses = {self.client.http_request(conn, "GET", "/").status for _ in range(requests)}
        finally:
            self.client.http_close(conn)
        after_ipt, after_bpf = _iptables_counts(), self._bpf_counts()
        walked = after_ipt["policy-entry"] - before_ipt["policy-entry"]
        if self.dataplane == "ebpf":
            decided = after_bpf["direct"] - before_bpf["direct"]
            return (
                statuses == {200} and decided == 1 and walked == 0,
                f"{requests} requests on one flow: connect4 decided {decided}x, "
                f"the iptables policy chain saw it {walked}x",
            )
        cached = after_ipt["verdict-cached"] - before_ipt["verdict-cached"]
        return (
            statuses == {200} and walked == 1 and cached >= requests,
            f"{requests} requests on one flow: policy chain walked {walked}x, "
            f"connmark short-cut {cached} packets",
        )

    def l4_only_direct(self) -> tuple[bool, str]:
        reply = self.client.request(self.ip("api"), 7000, "GET", "/")
        peer = json.loads(reply.body).get("peer") if reply.status == 200 else None
        via_envoy = reply.headers.get("server") == "envoy"
        return (
            reply.status == 200 and not via_envoy and peer == self.ip("client"),
            f"api:7000 (L4 rules only) answered {reply.status}, "
            f"{'through Envoy' if via_envoy else 'without Envoy'}, seeing peer {peer}",
        )

    def live_change(self) -> tuple[bool, str]:
        conn = self.client.http_open(self.ip("web"), 8080)
        original = (self.node.policy_dir / "web.yaml").read_text()
        try:
            first = self.client.http_request(conn, "GET", "/public/hello").status
            if first != 200:
                return False, f"before the change: {first}"
            started = time.perf_counter()
            self.node.write_policies(
                {"web.yaml": original.rstrip("\n") + TIGHTENED_WEB_RULE}, replace=False
            )
            status, attempts = first, 0
            while status == 200 and time.perf_counter() - started < 5:
                status = self.client.http_request(conn, "GET", "/public/hello").status
                attempts += 1
            elapsed_ms = (time.perf_counter() - started) * 1000
        finally:
            self.client.http_close(conn)
            self.node.write_policies({"web.yaml": original}, replace=False)
            self.node.wait_synced()
        within = "within" if elapsed_ms <= LIVE_CHANGE_BUDGET_MS else "over"
        return (
            status == 403,
            f"same keep-alive connection: 200 -> {status} {elapsed_ms:.1f} ms after the "
            f"policy file changed ({attempts} requests; {within} the "
            f"{LIVE_CHANGE_BUDGET_MS:.0f} ms budget)",
        )

    def _steered_requests(self, requests: int) -> None:
        conn = self.client.http_open(self.ip("web"), 8080)
        try:
            for _ in range(requests):
                self.client.http_request(conn, "GET", "/public/hello")
        finally:
            self.client.http_close(conn)

    def skmsg_counters(self) -> tuple[bool, str]:
        requests = 50
        before = self._bpf_counts()
        self._steered_requests(requests)
        after = self._bpf_counts()
        msgs, nbytes = after["msgs"] - before["msgs"], after["bytes"] - before["bytes"]
        return (
            msgs >= requests,
            f"{requests} requests: sk_msg handed {msgs} messages ({nbytes} bytes) straight "
            "to the peer socket",
        )

    def veth_quiet(self) -> tuple[bool, str]:
        requests = 50
        veth = self.node.lab.pod("default", "client").veth
        before = _veth_packets(veth)
        self._steered_requests(requests)
        packets = _veth_packets(veth) - before
        # Through the stack, every request and response would cross the veth at least
        # once each way; with sk_msg only the handshake and teardown do.
        return (
            packets < requests // 2,
            f"{requests} steered requests: the client's veth carried {packets} packets "
            "(handshake and teardown only)",
        )

    def _bpf_counts(self) -> dict[str, int]:
        if self.dataplane != "ebpf":
            return {}
        bpf = BpfObjects.load(HostKernel())
        try:
            return bpf.counters(bpf.slots["default/client"])
        finally:
            bpf.close()


def _iptables_counts() -> dict[str, int]:
    """Packets per rule comment of STEER-PRE and of the verdict chain it jumps to."""
    rows = run_in_netns(
        NODE_NETNS,
        lambda: [
            *iptables.counters("mangle", CHAIN_PRE),
            *iptables.counters("mangle", CHAIN_DECIDE),
        ],
    )
    return {row.comment: row.packets for row in rows}


def _veth_packets(veth: str) -> int:
    out = subprocess.run(
        ["ip", "-n", NODE_NETNS, "-s", "-j", "link", "show", "dev", veth],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["packets"]) + int(stats["tx"]["packets"])


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
    if BPF_PIN_DIR.exists():
        found.append(f"BPF pins {BPF_PIN_DIR}")
    return found


def _switch(checks: _Checks, dataplane: str) -> None:
    """Move the client pod to `dataplane` through its annotation, keeping a keep-alive
    connection open across the switch, and check the connection survived it."""
    node, client = checks.node, checks.client
    conn = client.http_open(node.ip("web"), 8080)
    try:
        before = client.http_request(conn, "GET", "/public/hello")
        node.set_annotations("client", {ANNOTATION_DATAPLANE: dataplane})
        now = node.dataplane_of("client")
        after = client.http_request(conn, "GET", "/public/hello")
    finally:
        client.http_close(conn)
    checks.dataplane = now
    checks.results.append(
        Check(
            "switch-keeps-connections",
            now,
            now == dataplane
            and (before.status, after.status) == (200, 200)
            and before.local_port == after.local_port,
            f"client moved to {now}; the same connection answered {before.status} then "
            f"{after.status}",
        )
    )


def run_demo(keep: bool = False, dataplane: str = "iptables", ads: str = "delta") -> DemoResult:
    """`dataplane`: iptables, ebpf, or both (iptables first, then the client switches)."""
    first = "ebpf" if dataplane == "ebpf" else "iptables"
    specs = [
        replace(s, annotations={ANNOTATION_DATAPLANE: first}) if s.name == "client" else s
        for s in default_lab_specs()
    ]
    checks: _Checks | None = None
    try:
        with LocalNode.start(specs=specs, ads=ads, keep=keep) as node, ExitStack() as pods:
            web, api, client = (node.lab.pod("default", n) for n in ("web", "api", "client"))
            web_worker = pods.enter_context(PodProcess.start(web.netns, web.cgroup))
            web_worker.serve_http(web.ip, 8080, "web")
            web_worker.serve_echo(web.ip, 9090)
            pods.enter_context(PodProcess.start(api.netns, api.cgroup)).serve_http(
                api.ip, 7000, "api"
            )
            checks = _Checks(
                node, pods.enter_context(PodProcess.start(client.netns, client.cgroup))
            )
            checks.dataplane = node.dataplane_of("client")
            checks.run_common()
            if dataplane == "both":
                _switch(checks, "ebpf")
                checks.run_common()
            if checks.dataplane == "ebpf":
                checks.run_ebpf_only()
            if keep:
                pods.pop_all()
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
