"""The iptables datapath on the real kernel: verdicts once per flow, redirect, revocation,
atomic apply and a clean unload, in a lab node of its own."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from steer.constants import ENVOY_OUTBOUND_PORT, ENVOY_SERVICE_PORTS, LAB_GATEWAY_IP, NODE_NETNS
from steer.lab.servers import connect, original_dst, serve, time_connect
from steer.lab.spec import LabState
from steer.model.enforce import resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.node import conntrack, iptables
from steer.node.datapath import IptablesDatapath, SyncReport, apply_ruleset
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns
from steer.render.iptables import CHAIN_DECIDE, CHAIN_PRE, Rule, Ruleset, render_ruleset
from tests.privileged.conftest import lab_pods, unload_rules
from tests.samples import policy_yaml, sample_policies, tenant_client_policies

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("node_clean")]


def pods_of(lab: LabState, annotations: dict[str, dict[str, str]] | None = None) -> list[Pod]:
    return lab_pods(lab, annotations, {"steer.dev/allow-exclusions": "true"})


def ip_of(lab: LabState, name: str) -> str:
    return lab.pod("default", name).ip


def netns_of(lab: LabState, name: str) -> str:
    return lab.pod("default", name).netns


def sync(policies: list[HTTPPolicy], pods: list[Pod], dp: IptablesDatapath) -> SyncReport:
    report = run_in_netns(NODE_NETNS, lambda: dp.sync(policies, pods))
    assert report.errors == []
    return report


def in_node(argv: list[str]) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", NODE_NETNS, *argv], check=True, capture_output=True, text=True
    ).stdout


def pre_counters() -> dict[str, int]:
    """Packets per rule of STEER-PRE and of the verdict chain it jumps to."""
    rows = run_in_netns(
        NODE_NETNS,
        lambda: [
            *iptables.counters("mangle", CHAIN_PRE),
            *iptables.counters("mangle", CHAIN_DECIDE),
        ],
    )
    return {row.comment: row.packets for row in rows}


@pytest.fixture
def servers(lab: LabState) -> Iterator[None]:
    with (
        serve(netns_of(lab, "api"), ip_of(lab, "api"), 7000, http=False),
        serve(netns_of(lab, "api"), ip_of(lab, "api"), 7001, http=False),
        serve(netns_of(lab, "web"), ip_of(lab, "web"), 9090, http=False),
    ):
        yield


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_allowed_flow_walks_the_policy_chain_once(lab: LabState, servers: None) -> None:
    sync(sample_policies(), pods_of(lab), IptablesDatapath())
    before = pre_counters()
    with connect(netns_of(lab, "client"), ip_of(lab, "api"), 7000) as sock:
        for i in range(300):
            assert echo(sock, f"ping {i}".encode()) == f"ping {i}".encode()
    after = pre_counters()
    assert after["policy-entry"] - before["policy-entry"] == 1
    assert after["verdict-cached"] - before["verdict-cached"] >= 300


def test_l4_denied_port_is_refused_at_once(lab: LabState, servers: None) -> None:
    sync(sample_policies(), pods_of(lab), IptablesDatapath())
    outcome, seconds = time_connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)
    assert outcome == "refused"
    assert seconds < 1.0
    # Default deny: api listens on 7001, but no rule allows it.
    assert time_connect(netns_of(lab, "client"), ip_of(lab, "api"), 7001)[0] == "refused"


def test_without_policy_the_same_ports_connect(lab: LabState, servers: None) -> None:
    sync([], pods_of(lab), IptablesDatapath())
    assert time_connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)[0] == "connected"


def _fake_envoy(
    accepted: list[tuple[str, int]], port: int = ENVOY_OUTBOUND_PORT
) -> tuple[socket.socket, threading.Thread]:
    def create() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(8)
        return sock

    listener = run_in_netns(NODE_NETNS, create)

    def accept_one() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:  # closed by the test: nothing connected, `accepted` stays empty
            return
        with conn:
            accepted.append(original_dst(conn))

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    return listener, thread


def client_to_web_reaches_envoy(lab: LabState) -> list[tuple[str, int]]:
    """Connect client -> web:8080; the original destinations a fake Envoy on the
    outbound port accepted (none if the connection went direct)."""
    accepted: list[tuple[str, int]] = []
    listener, thread = _fake_envoy(accepted)
    try:
        connect(netns_of(lab, "client"), ip_of(lab, "web"), 8080).close()
        thread.join(timeout=3)
    finally:
        listener.close()
    return accepted


def test_l7_flow_is_redirected_with_its_original_destination(lab: LabState) -> None:
    sync(sample_policies(), pods_of(lab), IptablesDatapath())
    assert client_to_web_reaches_envoy(lab) == [(ip_of(lab, "web"), 8080)]


def test_excluded_port_skips_envoy(lab: LabState) -> None:
    pods = pods_of(lab, {"client": {"steer.dev/exclude-outbound-ports": "8080"}})
    sync(sample_policies(), pods, IptablesDatapath())
    with (
        serve(netns_of(lab, "web"), ip_of(lab, "web"), 8080, http=False),
        connect(netns_of(lab, "client"), ip_of(lab, "web"), 8080) as sock,
    ):
        assert echo(sock, b"direct") == b"direct"


def _excluding_web(lab: LabState, client_namespace: str) -> None:
    pods = [
        replace(p, namespace=client_namespace) if p.name == "client" else p
        for p in pods_of(lab, {"web": {"steer.dev/exclude-inbound-ports": "8080"}})
    ]
    sync(tenant_client_policies(ip_of(lab, "web")), pods, IptablesDatapath())


def test_an_inbound_exclusion_skips_envoy_for_its_own_namespace(lab: LabState) -> None:
    _excluding_web(lab, "default")
    with (
        serve(netns_of(lab, "web"), ip_of(lab, "web"), 8080, http=False),
        connect(netns_of(lab, "client"), ip_of(lab, "web"), 8080) as sock,
    ):
        assert echo(sock, b"direct") == b"direct"


def test_an_inbound_exclusion_does_not_skip_another_namespaces_http_rules(
    lab: LabState,
) -> None:
    """web excludes 8080 from Envoy; a client in another namespace whose egress policy
    has HTTP rules for web:8080 still goes through Envoy (it used to go direct)."""
    _excluding_web(lab, "tenant")
    assert client_to_web_reaches_envoy(lab) == [(ip_of(lab, "web"), 8080)]


@pytest.mark.parametrize("port", [ENVOY_OUTBOUND_PORT, ENVOY_SERVICE_PORTS[0]])
def test_pod_dialling_envoy_directly_is_refused(lab: LabState, port: int) -> None:
    """Envoy's shared listener, or a Service port's, which would take the pod for a client
    of that Service."""
    sync(sample_policies(), pods_of(lab), IptablesDatapath())
    accepted: list[tuple[str, int]] = []
    listener, thread = _fake_envoy(accepted, port)
    try:
        outcome, _ = time_connect(netns_of(lab, "client"), LAB_GATEWAY_IP, port)
    finally:
        # shutdown wakes the blocked accept (close alone would not), so the thread ends here.
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=3)
    assert outcome == "refused"
    assert accepted == []


def _with_api_ports(*ports: int) -> list[HTTPPolicy]:
    """The sample policies, with api admitting the client on exactly these ports."""
    port_list = ", ".join(f"{{port: {p}}}" for p in ports)
    api, errors = parse_policies(
        policy_yaml(
            f"""spec:
  podSelector: {{matchLabels: {{app: api}}}}
  ingress:
    defaultAction: Deny
    rules:
      - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
        ports: [{port_list}]
""",
            name="api",
        ),
        "api.yaml",
    )
    assert not errors
    return [p for p in sample_policies() if p.metadata.name != "api"] + api


def test_policy_change_revokes_exactly_the_affected_flows(lab: LabState, servers: None) -> None:
    dp = IptablesDatapath()
    sync(_with_api_ports(7000, 7001), pods_of(lab), dp)
    client = netns_of(lab, "client")
    doomed = connect(client, ip_of(lab, "api"), 7000, timeout=3)
    kept = connect(client, ip_of(lab, "api"), 7001, timeout=3)
    try:
        assert echo(doomed, b"a") == b"a"
        assert echo(kept, b"b") == b"b"

        report = sync(_with_api_ports(7001), pods_of(lab), dp)
        assert report.revoked == 1
        started = time.perf_counter()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(50):
                if echo(doomed, b"again") != b"again":
                    raise ConnectionResetError("closed")
                time.sleep(0.01)
        assert time.perf_counter() - started < 1.0
        assert echo(kept, b"still") == b"still"
    finally:
        doomed.close()
        kept.close()


def test_flows_carry_verdict_and_policy_id_in_conntrack(lab: LabState, servers: None) -> None:
    dp = IptablesDatapath()
    sync(sample_policies(), pods_of(lab), dp)
    with connect(netns_of(lab, "client"), ip_of(lab, "api"), 7000) as sock:
        echo(sock, b"x")
        flows = run_in_netns(NODE_NETNS, conntrack.flows)
    assert dp.enforcement is not None
    api_id = dp.enforcement.policy_ids["default/api"]
    mine = [f for f in flows if str(f.dst) == ip_of(lab, "api") and f.dport == 7000]
    assert [(f.verdict, f.policy_id) for f in mine] == [(1, api_id)]


def test_failed_apply_keeps_previous_rules(lab: LabState) -> None:
    good = render_ruleset(resolve(sample_policies(), pods_of(lab)))
    run_in_netns(NODE_NETNS, lambda: apply_ruleset(HostKernel(), good))
    broken = Ruleset(
        chains=good.chains,
        rules=(*good.rules, Rule("mangle", CHAIN_PRE, ("-j", "NO-SUCH-TARGET"), "broken")),
        jumps=good.jumps,
    )
    with pytest.raises(iptables.IptablesError):
        run_in_netns(NODE_NETNS, lambda: apply_ruleset(HostKernel(), broken))
    run_in_netns(NODE_NETNS, lambda: iptables.verify(good))


@pytest.mark.parametrize("read_back", ["rule by rule", "dump"])
def test_read_back_catches_a_chain_changed_behind_our_back(
    lab: LabState, read_back: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of reading chains back see a rule someone else deleted, and a missing
    entry jump."""
    per_rule = 0.0 if read_back == "rule by rule" else 1e9
    monkeypatch.setattr(iptables, "RULE_BY_RULE_US", per_rule)
    good = render_ruleset(resolve(sample_policies(), pods_of(lab)))
    run_in_netns(NODE_NETNS, lambda: apply_ruleset(HostKernel(), good))
    side = next(c for c in good.chains["mangle"] if c != CHAIN_PRE)
    checked = {"mangle": (side,)}
    run_in_netns(NODE_NETNS, lambda: iptables.verify(good, checked))

    in_node(["iptables-legacy", "-t", "mangle", "-D", side, "1"])
    with pytest.raises(iptables.IptablesError, match=f"mangle/{side} read back"):
        run_in_netns(NODE_NETNS, lambda: iptables.verify(good, checked))

    run_in_netns(NODE_NETNS, lambda: apply_ruleset(HostKernel(), good))  # no previous: rewrites all
    entry = next(j for j in good.jumps if j.table == "nat")
    in_node(["iptables-legacy", "-t", "nat", "-D", entry.builtin, *entry.spec().split()])
    with pytest.raises(iptables.IptablesError, match="entry jumps missing"):
        run_in_netns(NODE_NETNS, lambda: iptables.verify(good, checked))
    run_in_netns(NODE_NETNS, lambda: apply_ruleset(HostKernel(), good))


def test_chains_another_tool_changed_are_found_and_written_again(
    lab: LabState, servers: None
) -> None:
    """A change no longer reads steer's chains back, so the agents' periodic drift check
    must find what another tool did (here: steer's entry jumps deleted, which lets a denied
    port through; then one rule deleted inside a chain, which only the every-rule check
    sees), and the next sync writes everything again."""
    dp = IptablesDatapath()
    sync(sample_policies(), pods_of(lab), dp)
    assert dp.applied is not None
    assert not run_in_netns(NODE_NETNS, lambda: dp.drifted(every_rule=True))
    for jump in dp.applied.jumps:
        in_node(["iptables-legacy", "-t", jump.table, "-D", jump.builtin, *jump.spec().split()])
    assert time_connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)[0] == "connected"

    assert run_in_netns(NODE_NETNS, dp.drifted)
    sync(sample_policies(), pods_of(lab), dp)
    assert time_connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)[0] == "refused"

    applied = dp.applied
    assert applied is not None
    side = next(c for c in applied.chains["mangle"] if c.startswith("STEER-SI-"))
    in_node(["iptables-legacy", "-t", "mangle", "-D", side, "1"])
    assert not run_in_netns(NODE_NETNS, dp.drifted), "names and jumps alone cannot see it"
    assert run_in_netns(NODE_NETNS, lambda: dp.drifted(every_rule=True))
    sync(sample_policies(), pods_of(lab), dp)
    run_in_netns(NODE_NETNS, lambda: iptables.verify(applied))
    assert dp.repairs == 2


def test_a_rule_another_tool_puts_ahead_of_steers_jump_is_found_and_steer_goes_first(
    lab: LabState, servers: None
) -> None:
    """kube-proxy prepends its own jumps when it starts after steer; its KUBE-FORWARD then
    accepts packets before steer's denials run. Replayed with a foreign ACCEPT at the top
    of filter FORWARD: the denied port connects, the drift check finds it, the next sync
    puts steer's jump back on top, once, and the port is refused again; the foreign rule
    stays."""
    dp = IptablesDatapath()
    sync(sample_policies(), pods_of(lab), dp)
    foreign = ["-p", "tcp", "-m", "comment", "--comment", "another-tool", "-j", "ACCEPT"]
    in_node(["iptables-legacy", "-t", "filter", "-I", "FORWARD", "1", *foreign])
    try:
        assert time_connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)[0] == "connected"
        assert run_in_netns(NODE_NETNS, dp.drifted)
        sync(sample_policies(), pods_of(lab), dp)
        assert time_connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)[0] == "refused"
        rules = in_node(["iptables-legacy", "-t", "filter", "-S", "FORWARD"]).splitlines()
        assert [r for r in rules if "STEER-FWD" in r] == [rules[1]], rules
        assert any("another-tool" in r for r in rules), rules
    finally:
        in_node(["iptables-legacy", "-t", "filter", "-D", "FORWARD", *foreign])


FOREIGN_RULES = (
    ("filter", "INPUT", "-p", "udp", "--dport", "5353", "-j", "FOREIGN"),
    ("nat", "PREROUTING", "-p", "tcp", "--dport", "1", "-j", "RETURN"),
)


def _foreign(action: str) -> None:
    for table, chain, *args in FOREIGN_RULES:
        in_node(["iptables-legacy", "-t", table, action, chain, *args])


def test_unload_leaves_foreign_rules_untouched(lab: LabState) -> None:
    in_node(["iptables-legacy", "-N", "FOREIGN"])
    _foreign("-A")
    try:
        foreign_before = _non_steer_rules()
        sync(sample_policies(), pods_of(lab), IptablesDatapath())
        assert "STEER-PRE" in in_node(["iptables-legacy-save"])
        run_in_netns(NODE_NETNS, unload_rules)
        assert "STEER" not in in_node(["iptables-legacy-save"])
        assert _non_steer_rules() == foreign_before
    finally:
        _foreign("-D")
        in_node(["iptables-legacy", "-X", "FOREIGN"])


def _non_steer_rules() -> list[str]:
    return [
        line
        for line in in_node(["iptables-legacy-save"]).splitlines()
        if line.startswith(("-A", ":")) and "STEER" not in line and "steer/" not in line
    ]


CLIENT_V6, WEB_V6, NODE_LINK_LOCAL = "fd00:5eed::2", "fd00:5eed::3", "fe80::1"


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


@contextmanager
def ipv6_between(lab: LabState, pods: dict[str, str]) -> Iterator[None]:
    """Give pods IPv6 addresses routed through the node, as a tenant with its own
    addresses (or a dual-stack CNI) would; remove them again afterwards."""
    in_node(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    try:
        for name, address in pods.items():
            pod = lab.pod("default", name)
            _ip(
                NODE_NETNS,
                "-6",
                "addr",
                "replace",
                f"{NODE_LINK_LOCAL}/64",
                "dev",
                pod.veth,
                "nodad",
            )
            _ip(NODE_NETNS, "-6", "route", "replace", f"{address}/128", "dev", pod.veth)
            _ip(pod.netns, "-6", "addr", "replace", f"{address}/128", "dev", "eth0", "nodad")
            _ip(
                pod.netns,
                "-6",
                "route",
                "replace",
                "default",
                "via",
                NODE_LINK_LOCAL,
                "dev",
                "eth0",
            )
        yield
    finally:
        for name, address in pods.items():
            pod = lab.pod("default", name)
            subprocess.run(
                ["ip", "-n", pod.netns, "-6", "addr", "del", f"{address}/128", "dev", "eth0"],
                check=False,
                capture_output=True,
            )
            subprocess.run(
                ["ip", "-n", NODE_NETNS, "-6", "route", "del", f"{address}/128"],
                check=False,
                capture_output=True,
            )
        in_node(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"])


def test_ipv6_tcp_of_steered_pods_is_refused(lab: LabState) -> None:
    """The attack: a port web denies over IPv4 answered over IPv6. Until steer has IPv6
    policy, steered pods' IPv6 TCP through the node is refused."""
    with (
        ipv6_between(lab, {"client": CLIENT_V6, "web": WEB_V6}),
        serve(netns_of(lab, "web"), WEB_V6, 9090, http=False),
    ):
        # Without steer's rules the path exists: the test would pass for the wrong reason
        # if IPv6 simply did not route.
        with connect(netns_of(lab, "client"), WEB_V6, 9090) as sock:
            assert echo(sock, b"v6") == b"v6"
        sync(sample_policies(), pods_of(lab), IptablesDatapath())
        with pytest.raises(ConnectionRefusedError):
            connect(netns_of(lab, "client"), WEB_V6, 9090)
        # To the node itself too (its link-local address on the pod's link).
        with pytest.raises(ConnectionRefusedError):
            connect(netns_of(lab, "client"), f"{NODE_LINK_LOCAL}%eth0", 22)
        # IPv4 is unchanged: 9090 is denied by web's policy, and refused at once.
        with pytest.raises(ConnectionRefusedError):
            connect(netns_of(lab, "client"), ip_of(lab, "web"), 9090)


def test_unload_removes_the_ipv6_rules_too(lab: LabState) -> None:
    sync(sample_policies(), pods_of(lab), IptablesDatapath())
    assert "STEER6-FWD" in in_node(["ip6tables-legacy-save", "-t", "filter"])
    run_in_netns(NODE_NETNS, unload_rules)
    assert "STEER6" not in in_node(["ip6tables-legacy-save", "-t", "filter"])
