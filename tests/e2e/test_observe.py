"""`steer observe` on both datapaths: requests through the real Envoy reach the agent over
gRPC ALS and come back out of `steer observe --json`, each with the client pod, its
datapath, the verdict and the policy and rule that decided it."""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from steer.cli import main
from steer.constants import (
    BPF_MAX_PODS,
    CONTROL_METRICS_PORT,
    LAB_NODE_NAME,
    METRICS_PORT,
    NODE_NETNS,
)
from steer.lab.podproc import PodProcessError
from steer.node.envoy import set_access_log_percent
from steer.node.netns import run_in_netns
from steer.node.observe import LIVE_AFTER_S
from tests.e2e.conftest import HTTP_PORT, PodsNode
from tests.e2e.test_http_policy import (
    ALLOWED,
    DENIED,
    apply,
    exact,
    expect,
    http_rule,
    ingress,
    prefix,
    request,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.envoy,
    pytest.mark.usefixtures("http_servers"),
]

# The interface outside checks rely on (docs/observability.md).
KEYS = {
    "pod", "namespace", "pid", "comm", "src", "dst", "dataplane", "verdict", "layer",
    "policy", "rule", "method", "path", "status",
}  # fmt: skip
# The discard port: no test server listens there.
NOTHING_LISTENS = 9
WEB_PUBLIC = ingress(
    "web",
    {"name": "public", **http_rule(paths=[prefix("/public/")])},
    {"name": "no-secret", **http_rule("Deny", paths=[exact("/public/secret")])},
)


def observe(*args: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["observe", "--json", *args]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def observed(path: str, count: int = 1) -> list[dict[str, Any]]:
    """The events for `path`, once Envoy has flushed them (every 200 ms)."""
    deadline = time.monotonic() + 10
    while True:
        events = [e for e in observe("--last", "500") if e["path"] == path]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def test_allowed_and_denied_requests_name_pod_datapath_policy_and_rule(node: PodsNode) -> None:
    apply(node, WEB_PUBLIC)
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    cases = {
        f"/public/{tag}": (ALLOWED, "allowed", 200, "public"),
        f"/admin/{tag}": (DENIED, "denied", 403, "default-deny"),
    }
    for path, (outcome, *_) in cases.items():
        expect(request(node, path), outcome)
    expect(request(node, "/public/secret"), DENIED)
    for path, (_, verdict, status, rule) in cases.items():
        (event,) = observed(path)
        assert event.keys() >= KEYS
        assert (event["pod"], event["namespace"], event["dataplane"]) == (
            "client",
            "default",
            node.dataplane,
        )
        assert (event["verdict"], event["status"], event["layer"]) == (verdict, status, "http")
        assert (event["policy"], event["rule"]) == ("default/web-ingress", rule)
        assert (event["method"], event["dst"]) == ("GET", f"{node.ip('web')}:{HTTP_PORT}")
        assert event["src"].startswith(f"{node.ip('client')}:")
        # The process behind the request: a socket hook saw it open the connection
        # (sockops on eBPF, the observe program on iptables).
        client = node.workers["client"]
        comm = Path(f"/proc/{client.pid}/comm").read_text().strip()
        assert (event["pid"], event["comm"]) == (client.pid, comm), (
            event,
            [e for e in observe("--last", "50") if e["layer"] == "l4"],
        )
    secret = observed("/public/secret")[-1]
    # Envoy's RBAC verdict names the deny rule itself.
    assert (secret["verdict"], secret["rule"], secret["details"]) == (
        "denied",
        "no-secret",
        "rbac_access_denied_matched_policy[default/web:default/web-ingress/1/no-secret]",
    )


def test_filters_select_events(node: PodsNode) -> None:
    apply(node, WEB_PUBLIC)
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    expect(request(node, f"/public/{tag}"), ALLOWED)
    expect(request(node, f"/admin/{tag}"), DENIED)
    observed(f"/admin/{tag}")
    denied = observe("--last", "500", "--verdict", "denied", "--status", "403")
    assert f"/admin/{tag}" in {e["path"] for e in denied}
    assert all(e["verdict"] == "denied" for e in denied)
    by_pod = observe("--last", "500", "--pod", "default/client", "--port", str(HTTP_PORT))
    assert {f"/public/{tag}", f"/admin/{tag}"} <= {e["path"] for e in by_pod}
    assert observe("--last", "500", "--pod", "nobody") == []


@contextlib.contextmanager
def access_log_share(percent: int) -> Iterator[None]:
    """Envoy's access log sampled at `percent` while the block runs, as an operator would
    set it (docs/observability.md), and every request logged again after."""
    set_access_log_percent(percent)
    try:
        yield
    finally:
        set_access_log_percent(100)


def test_a_sampled_access_log_still_logs_every_denial_and_audited_request(
    node: PodsNode,
) -> None:
    """With the share at 0, an allowed request is not logged; a denial and an audited
    would-be denial still are, with the rule that decided."""
    apply(
        node,
        ingress(
            "web",
            {"name": "public", **http_rule(paths=[prefix("/public/")])},
            {
                "name": "would-block-audited",
                "mode": "Audit",
                **http_rule("Deny", paths=[prefix("/public/audited/")]),
            },
        ),
    )
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    with access_log_share(0):
        expect(request(node, f"/public/{tag}"), ALLOWED)
        expect(request(node, f"/public/audited/{tag}"), ALLOWED)
        expect(request(node, f"/admin/{tag}"), DENIED)
        (denied,) = observed(f"/admin/{tag}")
        (audited,) = observed(f"/public/audited/{tag}")
        # Envoy flushes each worker's entries every 200 ms: by now the allowed request,
        # sent first, would be here had it been logged.
        time.sleep(1)
        assert f"/public/{tag}" not in {e.get("path") for e in observe("--last", "500")}
    assert (denied["verdict"], denied["status"], denied["rule"]) == ("denied", 403, "default-deny")
    assert (audited["verdict"], audited["status"], audited["rule"]) == (
        "audit",
        200,
        "would-block-audited",
    )
    # Logged again once the share is back.
    expect(request(node, f"/public/again/{tag}"), ALLOWED)
    (again,) = observed(f"/public/again/{tag}")
    assert again["verdict"] == "allowed"


def scrape(port: int, path: str = "/metrics") -> str:
    """A scrape from inside the node's namespace, where the agent and control plane run."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return str(reply.read().decode())

    return run_in_netns(NODE_NETNS, get)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


def test_metrics_count_requests_syncs_and_xds_and_expose_envoys_stats(node: PodsNode) -> None:
    apply(node, WEB_PUBLIC)
    denied = {"verdict": "denied", "dataplane": node.dataplane, "policy": "default/web-ingress"}
    before = sample(scrape(METRICS_PORT), "steer_http_requests_total", **denied)
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    for _ in range(3):
        expect(request(node, f"/admin/{tag}"), DENIED)
    observed(f"/admin/{tag}", count=3)
    agent = scrape(METRICS_PORT)
    assert sample(agent, "steer_http_requests_total", **denied) == before + 3
    assert sample(agent, "steer_agent_syncs_total", result="ok") >= 1
    assert sample(agent, "steer_agent_sync_seconds_count") >= 1
    if node.dataplane == "ebpf":
        assert sample(agent, "steer_ebpf_connects_total", verdict="l7") >= 1
    # The maps' fill, read from the kernel on both datapaths (iptables pods' flow records
    # live in BPF maps too); each eBPF pod has its steer_pods entry.
    pods = sample(agent, "steer_bpf_map_entries", map="steer_pods")
    assert sample(agent, "steer_bpf_map_capacity", map="steer_pods") == BPF_MAX_PODS
    assert sample(agent, "steer_bpf_map_pressure", map="steer_pods") == pods / BPF_MAX_PODS
    if node.dataplane == "ebpf":
        assert pods >= 2  # the client and web pods at least
    control = scrape(CONTROL_METRICS_PORT)
    assert sample(control, "steer_xds_acks_total", node=LAB_NODE_NAME) >= 1
    assert sample(control, "steer_xds_nacks_total", node=LAB_NODE_NAME) == 0
    assert sample(control, "steer_policy_propagation_seconds_count") >= 1
    # Envoy's own stats, through the agent: the admin socket stays private.
    envoy = scrape(METRICS_PORT, "/stats/prometheus")
    assert "envoy_http_downstream_rq_total" in envoy


def test_audit_mode_lets_a_request_through_and_records_it(node: PodsNode) -> None:
    """A Deny rule of mode Audit on /admin: the request gets the server's 200, and steer
    observe and the metrics show it as `audit`, naming the rule."""
    apply(
        node,
        ingress(
            "web",
            {
                "name": "would-block-admin",
                "mode": "Audit",
                **http_rule("Deny", paths=[prefix("/admin")]),
            },
            default="Allow",
        ),
    )
    audited = {"verdict": "audit", "dataplane": node.dataplane, "policy": "default/web-ingress"}
    before = sample(scrape(METRICS_PORT), "steer_http_requests_total", **audited)
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    expect(request(node, f"/admin/{tag}"), ALLOWED)
    expect(request(node, f"/other/{tag}"), ALLOWED)
    (event,) = observed(f"/admin/{tag}")
    assert (event["verdict"], event["status"], event["policy"], event["rule"]) == (
        "audit",
        200,
        "default/web-ingress",
        "would-block-admin",
    )
    (other,) = observed(f"/other/{tag}")
    assert other["verdict"] == "allowed"
    assert sample(scrape(METRICS_PORT), "steer_http_requests_total", **audited) == before + 1


def l4_events(
    wanted: Callable[[dict[str, Any]], bool], within_s: float = 10
) -> list[dict[str, Any]]:
    """The L4 events `wanted` picks, once at least one has arrived (or after `within_s`)."""
    deadline = time.monotonic() + within_s
    while True:
        found = [e for e in observe("--last", "1000", "--layer", "l4") if wanted(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_an_audited_l4_rule_lets_the_flow_through_and_records_it(node: PodsNode) -> None:
    apply(
        node,
        ingress(
            "api",
            {"name": "would-close-http", "action": "Deny", "mode": "Audit",
             "ports": [{"port": HTTP_PORT}]},
            default="Allow",
        ),
    )  # fmt: skip
    audited = {"verdict": "audit", "dataplane": node.dataplane, "policy": "default/api-ingress"}
    before = sample(scrape(METRICS_PORT), "steer_flows_total", **audited)
    client = node.workers["client"]
    reply = client.request(node.ip("api"), HTTP_PORT, "GET", f"/audited/{time.monotonic_ns()}")
    assert reply.status == 200
    source = f"{node.ip('client')}:{reply.local_port}"
    (flow,) = l4_events(lambda e: e["src"] == source)
    assert (flow["verdict"], flow["policy"], flow["rule"], flow["pid"]) == (
        "audit",
        "default/api-ingress",
        "would-close-http",
        client.pid,
    )
    assert sample(scrape(METRICS_PORT), "steer_flows_total", **audited) == before + 1


def test_l4_flows_name_the_process_behind_them(node: PodsNode) -> None:
    """A connect refused at L4 and a direct flow, each an event with the client worker's
    pid and comm, the deciding rule, and for the flow its bytes and how it ended. On
    iptables the refusal is the rules' TCP reset, seen by the observe program."""
    apply(
        node,
        ingress(
            "web",
            {"name": "public", "ports": [{"port": HTTP_PORT}], **http_rule(paths=[prefix("/")])},
            {"name": "no-debug", "action": "Deny", "ports": [{"port": 9090}]},
        ),
    )
    client = node.workers["client"]
    comm = Path(f"/proc/{client.pid}/comm").read_text().strip()
    # Earlier tests' flows of the same worker to the same places are in the ring too.
    since = time.time() - 0.05
    assert client.connect_outcome(node.ip("web"), 9090)[0] == "refused"
    reply = client.request(node.ip("api"), HTTP_PORT, "GET", f"/flow/{time.monotonic_ns()}")
    assert reply.status == 200
    source = f"{node.ip('client')}:{reply.local_port}"
    deadline = time.monotonic() + 10
    while True:
        flows = [
            e
            for e in observe("--last", "1000", "--layer", "l4")
            if e["pid"] == client.pid and datetime.fromisoformat(e["time"]).timestamp() >= since
        ]
        refused = [e for e in flows if e["dst"] == f"{node.ip('web')}:9090"]
        direct = [e for e in flows if e["src"] == source]
        if (refused and direct) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert refused and direct, flows
    denied, served = refused[-1], direct[-1]
    assert (denied["verdict"], denied["end"], denied["comm"], denied["pod"]) == (
        "denied",
        "refused",
        comm,
        "client",
    )
    assert denied["dataplane"] == served["dataplane"] == node.dataplane
    assert denied["cgroup"] == node.lab.pod("default", "client").cgroup
    assert (denied["policy"], denied["rule"]) == ("default/web-ingress", "no-debug")
    assert (served["verdict"], served["via_envoy"], served["comm"], served["end"]) == (
        "allowed",
        False,
        comm,
        "fin",
    )
    assert served["bytes_sent"] > 0 and served["bytes_received"] > 0
    assert served["dst"] == f"{node.ip('api')}:{HTTP_PORT}"


def test_a_flow_that_lives_long_is_an_event_while_open_and_counted_once(node: PodsNode) -> None:
    """A connection kept open is an event once it has lived LIVE_AFTER_S, with its opener
    and verdict and no end or bytes yet, and again when it closes, with them. The
    metrics count the flow once."""
    apply(node, ingress("api", {"name": "kept-open", "ports": [{"port": HTTP_PORT}]}))
    labels = {"verdict": "allowed", "dataplane": node.dataplane, "policy": "default/api-ingress"}
    before = sample(scrape(METRICS_PORT), "steer_flows_total", **labels)
    client = node.workers["client"]
    comm = Path(f"/proc/{client.pid}/comm").read_text().strip()
    conn = client.http_open(node.ip("api"), HTTP_PORT)
    try:
        opened = client.http_request(conn, "GET", f"/long/{time.monotonic_ns()}")
        assert opened.status == 200
        source = f"{node.ip('client')}:{opened.local_port}"
        found = l4_events(lambda e: e["src"] == source, within_s=LIVE_AFTER_S + 15)
        assert found, f"no event of the open flow from {source}"
        (live,) = found
        assert (live["end"], live["bytes_sent"], live["verdict"], live["rule"]) == (
            None,
            None,
            "allowed",
            "kept-open",
        )
        assert (live["pid"], live["comm"], live["dataplane"]) == (client.pid, comm, node.dataplane)
        assert live["dst"] == f"{node.ip('api')}:{HTTP_PORT}"
        assert live["duration_ms"] >= LIVE_AFTER_S * 1000
        # Counted at its close, not before.
        assert sample(scrape(METRICS_PORT), "steer_flows_total", **labels) == before
    finally:
        client.http_close(conn)
    closed = l4_events(lambda e: e["src"] == source and e["end"] is not None)
    assert [(e["end"], e["pid"]) for e in closed] == [("fin", client.pid)]
    assert closed[0]["bytes_sent"] > 0
    assert len(l4_events(lambda e: e["src"] == source)) == 2
    assert sample(scrape(METRICS_PORT), "steer_flows_total", **labels) == before + 1


def test_an_allowed_connect_the_server_refuses_ends_refused(node: PodsNode) -> None:
    """Allowed by policy, reset by the server's kernel (nothing listens): the socket never
    reaches ESTABLISHED, and its event still comes, with its opener."""
    apply(node)
    client = node.workers["client"]
    since = time.time() - 0.05
    assert client.connect_outcome(node.ip("api"), NOTHING_LISTENS)[0] == "refused"
    dst = f"{node.ip('api')}:{NOTHING_LISTENS}"
    found = l4_events(
        lambda e: (
            e["dst"] == dst
            and e["pid"] == client.pid
            and datetime.fromisoformat(e["time"]).timestamp() >= since
        )
    )
    assert found, f"no event of the refused connect to {dst}"
    assert {k: found[-1][k] for k in ("verdict", "end", "dataplane", "pod", "via_envoy")} == {
        "verdict": "allowed",
        "end": "refused",
        "dataplane": node.dataplane,
        "pod": "client",
        "via_envoy": False,
    }


def test_a_flow_a_policy_change_revokes_ends_revoked(node: PodsNode) -> None:
    """An allowed direct flow, then a policy that denies it: the agent revokes the live
    connection (socket destroyed on eBPF, conntrack entry dropped on iptables), and its
    flow event ends `revoked`, not a plain reset."""
    apply(node)
    client = node.workers["client"]
    conn = client.http_open(node.ip("api"), HTTP_PORT)
    try:
        opened = client.http_request(conn, "GET", f"/kept/{time.monotonic_ns()}")
        assert opened.status == 200
        apply(
            node,
            ingress("api", {"name": "closed", "action": "Deny", "ports": [{"port": HTTP_PORT}]}),
        )
        with pytest.raises(PodProcessError):
            client.http_request(conn, "GET", "/after")
    finally:
        client.http_close(conn)
    source = f"{node.ip('client')}:{opened.local_port}"
    # Its close: a sync slower than LIVE_AFTER_S would have told of it while open too.
    ended = l4_events(lambda e: e["src"] == source and e["end"] is not None)
    assert ended, f"no flow event from {source}"
    (flow,) = ended
    assert (flow["end"], flow["pid"], flow["dataplane"]) == ("revoked", client.pid, node.dataplane)
    assert flow["dst"] == f"{node.ip('api')}:{HTTP_PORT}"


def test_a_policy_of_mode_audit_enforces_nothing_and_records_what_it_would_deny(
    node: PodsNode,
) -> None:
    """A staged policy: web's ingress would allow /public only, and nothing on api's port.
    Every request and flow still gets through; what the policy would deny is `audit`,
    naming its rule (an HTTP deny) or its default."""
    staged = ingress(
        "web",
        http_rule("Allow", paths=[prefix("/public")]),
        {"name": "no-admin", **http_rule("Deny", paths=[prefix("/admin")])},
    )
    ((name, text),) = staged.items()
    document = yaml.safe_load(text)
    document["spec"] = {"podSelector": document["spec"]["podSelector"], "mode": "Audit",
                        "ingress": document["spec"]["ingress"]}  # fmt: skip
    api = ingress("api")  # every flow to api would be denied, by the default
    ((api_name, api_text),) = api.items()
    api_document = yaml.safe_load(api_text)
    api_document["spec"]["mode"] = "Audit"
    apply(node, {name: yaml.safe_dump(document), api_name: yaml.safe_dump(api_document)})
    tag = f"{node.dataplane}-{time.monotonic_ns()}"
    for path in ("public", "admin", "other"):
        expect(request(node, f"/{path}/{tag}"), ALLOWED)
    verdicts = {
        path: (e["verdict"], e["status"], e["policy"], e["rule"])
        for path in ("public", "admin", "other")
        for e in observed(f"/{path}/{tag}")
    }
    # Allowed by no policy in force (a policy of mode Audit decides nothing).
    assert verdicts == {
        "public": ("allowed", 200, None, None),
        "admin": ("audit", 200, "default/web-ingress", "no-admin"),
        "other": ("audit", 200, "default/web-ingress", "default-deny"),
    }
    client = node.workers["client"]
    reply = client.request(node.ip("api"), HTTP_PORT, "GET", f"/staged/{tag}")
    assert reply.status == 200
    source = f"{node.ip('client')}:{reply.local_port}"
    (flow,) = l4_events(lambda e: e["src"] == source)
    assert (flow["verdict"], flow["policy"], flow["rule"]) == (
        "audit",
        "default/api-ingress",
        "default-deny",
    )
