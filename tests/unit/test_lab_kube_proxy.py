"""The lab's stand-in for kube-proxy v1.20 (iptables mode): the rules a node would hold,
as iptables-save prints them there. Structure only: nothing here runs iptables."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

import pytest

from steer.lab.kubeproxy import (
    FIXED_CHAINS,
    JUMPS,
    is_kube_proxy_chain,
    kube_proxy_chains,
    probability,
    remove_kube_proxy_text,
    render_kube_proxy,
)
from steer.model.service import Backend, Frontend

VIP = IPv4Address("10.96.0.10")
NODE_IPS = (IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3"))
BACKENDS = tuple(Backend(IPv4Address(f"10.244.0.{i}"), 8080) for i in (5, 6, 7))
WEB = Frontend(VIP, 80, "default/web", "http", BACKENDS)
WEB_NODE_PORTS = [
    Frontend(ip, 30080, "default/web", "http", BACKENDS, node_port=True) for ip in NODE_IPS
]
EMPTY = Frontend(IPv4Address("10.96.0.11"), 80, "default/empty", "", ())
EMPTY_NODE_PORT = Frontend(NODE_IPS[0], 30081, "default/empty", "", (), node_port=True)


def table(text: str, name: str) -> list[str]:
    """The lines of one table's block, without its header and COMMIT."""
    block = text.split(f"*{name}\n", 1)[1].split("COMMIT\n", 1)[0]
    return block.splitlines()


def rules(text: str, name: str, chain: str) -> list[str]:
    prefix = f"-A {chain} "
    return [line[len(prefix) :] for line in table(text, name) if line.startswith(prefix)]


def chain_of(text: str, prefix: str) -> str:
    found = set(re.findall(rf"\b({prefix}[A-Z2-7]{{16}})\b", text))
    assert len(found) == 1, found
    return found.pop()


def test_chain_names_are_kube_proxys_own() -> None:
    # From a real node's iptables-save: default/nginx-basic:http with an endpoint at
    # 192.168.166.157:80 (kube-proxy hashes servicePortName + "tcp" [+ "ip:port"]).
    backend = Backend(IPv4Address("192.168.166.157"), 80)
    frontend = Frontend(IPv4Address("10.97.35.60"), 80, "default/nginx-basic", "http", (backend,))
    text = render_kube_proxy([frontend])
    assert chain_of(text, "KUBE-SVC-") == "KUBE-SVC-WWRFY3PZ7W3FGMQW"
    assert chain_of(text, "KUBE-SEP-") == "KUBE-SEP-2422Y4UT42X3LJXA"


def test_a_service_with_three_endpoints_balances_as_kube_proxy_does() -> None:
    text = render_kube_proxy([WEB])
    svc = chain_of(text, "KUBE-SVC-")
    assert rules(text, "nat", "KUBE-SERVICES") == [
        '! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http '
        'cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ',
        '-d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" '
        f"-m tcp --dport 80 -j {svc}",
        '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        'in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
    ]
    balancing = rules(text, "nat", svc)
    seps = [line.rsplit(" -j ", 1)[1] for line in balancing]
    assert balancing == [
        '-m comment --comment "default/web:http" -m statistic --mode random '
        f"--probability 0.33333333349 -j {seps[0]}",
        '-m comment --comment "default/web:http" -m statistic --mode random '
        f"--probability 0.50000000000 -j {seps[1]}",
        f'-m comment --comment "default/web:http" -j {seps[2]}',
    ]
    assert len(set(seps)) == 3
    for sep, backend in zip(seps, BACKENDS, strict=True):
        assert rules(text, "nat", sep) == [
            f'-s {backend.ip}/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ',
            '-p tcp -m comment --comment "default/web:http" -m tcp -j DNAT '
            f"--to-destination {backend.ip}:8080",
        ]
    # A Service with endpoints rejects nothing.
    assert rules(text, "filter", "KUBE-SERVICES") == []


def test_probabilities_are_kube_proxys_values_as_iptables_save_prints_them() -> None:
    # kube-proxy writes "%0.10f" of 1/n; the kernel keeps lround(p * 2^31) and
    # iptables-save prints that with 11 decimals.
    assert probability(2) == "0.50000000000"
    assert probability(3) == "0.33333333349"
    assert probability(4) == "0.25000000000"
    assert probability(10) == "0.10000000009"
    with pytest.raises(ValueError):
        probability(1)


def test_endpoints_come_in_kube_proxys_order_whatever_the_input_order() -> None:
    # Sorted as "ip:port" strings, as kube-proxy's endpoints cache sorts them.
    backends = (Backend(IPv4Address("10.244.0.9"), 80), Backend(IPv4Address("10.244.0.10"), 80))
    forward = render_kube_proxy([Frontend(VIP, 80, "default/web", "", backends)])
    backward = render_kube_proxy([Frontend(VIP, 80, "default/web", "", backends[::-1])])
    assert forward == backward
    dnat = [line for line in forward.splitlines() if "DNAT" in line]
    assert [line.rsplit(" ", 1)[1] for line in dnat] == ["10.244.0.10:80", "10.244.0.9:80"]


def test_node_ports_share_the_services_chain_and_come_last() -> None:
    text = render_kube_proxy([*WEB_NODE_PORTS, WEB])
    svc = chain_of(text, "KUBE-SVC-")
    # One rule pair per node port, however many node addresses carry it.
    assert rules(text, "nat", "KUBE-NODEPORTS") == [
        '-p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-MARK-MASQ',
        f'-p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j {svc}',
    ]
    assert rules(text, "nat", "KUBE-SERVICES")[-1].endswith(
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )
    # The same endpoints, balanced once.
    assert len(rules(text, "nat", svc)) == 3


def test_nodeport_addresses_narrow_the_jump_to_node_ports() -> None:
    text = render_kube_proxy([WEB], node_ips=NODE_IPS[::-1])
    tail = [r for r in rules(text, "nat", "KUBE-SERVICES") if r.endswith("-j KUBE-NODEPORTS")]
    assert [r.split()[1] for r in tail] == ["10.0.0.2/32", "10.0.0.3/32"]
    assert "addrtype" not in "".join(tail)


def test_without_a_cluster_cidr_no_off_cluster_client_is_masqueraded() -> None:
    assert "! -s" not in render_kube_proxy([WEB], cluster_cidr=None)
    other = render_kube_proxy([WEB], cluster_cidr=IPv4Network("10.32.0.0/12"))
    assert "! -s 10.32.0.0/12 -d 10.96.0.10/32" in other


def test_a_service_without_endpoints_is_rejected_in_filter_only() -> None:
    text = render_kube_proxy([EMPTY, EMPTY_NODE_PORT])
    assert rules(text, "filter", "KUBE-SERVICES") == [
        '-d 10.96.0.11/32 -p tcp -m comment --comment "default/empty has no endpoints" '
        "-m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"
    ]
    assert rules(text, "filter", "KUBE-EXTERNAL-SERVICES") == [
        '-p tcp -m comment --comment "default/empty has no endpoints" -m addrtype '
        "--dst-type LOCAL -m tcp --dport 30081 -j REJECT --reject-with icmp-port-unreachable"
    ]
    nat = "\n".join(table(text, "nat"))
    assert "KUBE-SVC-" not in nat and "KUBE-SEP-" not in nat
    assert "default/empty" not in nat
    assert rules(text, "nat", "KUBE-NODEPORTS") == []


def test_first_render_inserts_kube_proxys_entry_jumps_in_its_order() -> None:
    text = render_kube_proxy([WEB])
    inserted = [line for line in text.splitlines() if line.startswith("-I ")]
    assert inserted == [
        '-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes '
        'externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes '
        'externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service '
        'portals" -j KUBE-SERVICES',
        '-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service '
        'portals" -j KUBE-SERVICES',
        '-I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    ]


def test_kube_proxys_fixed_chains() -> None:
    text = render_kube_proxy([])
    assert rules(text, "nat", "KUBE-MARK-MASQ") == ["-j MARK --set-xmark 0x4000/0x4000"]
    assert rules(text, "nat", "KUBE-POSTROUTING") == [
        "-m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-j MARK --set-xmark 0x4000/0x0",
        '-m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    assert rules(text, "filter", "KUBE-FORWARD") == [
        "-m conntrack --ctstate INVALID -j DROP",
        '-m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-m comment --comment "kubernetes forwarding conntrack pod source rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        '-m comment --comment "kubernetes forwarding conntrack pod destination rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    assert table(text, "mangle") == [":KUBE-PROXY-CANARY - [0:0]"]


@pytest.mark.parametrize(
    "frontends",
    [[], [WEB], [EMPTY, EMPTY_NODE_PORT], [WEB, *WEB_NODE_PORTS, EMPTY, EMPTY_NODE_PORT]],
    ids=["none", "clusterip", "empty", "all"],
)
def test_restore_text_is_well_formed_and_touches_only_its_own_chains(
    frontends: list[Frontend],
) -> None:
    text = render_kube_proxy(frontends, node_ips=NODE_IPS)
    owned = kube_proxy_chains(frontends)
    assert text.endswith("COMMIT\n")
    blocks = re.findall(r"^\*(\w+)\n(.*?)^COMMIT$", text, re.M | re.S)
    assert [name for name, _ in blocks] == ["mangle", "filter", "nat"]
    for name, body in blocks:
        declared = re.findall(r"^:(\S+) - \[0:0\]$", body, re.M)
        assert set(declared) == owned[name], name
        for line in body.splitlines():
            verb, chain = line.split()[:2]
            if verb == "-A":
                assert chain in declared, line
            elif verb == "-I":
                assert chain in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")
            else:
                assert verb.startswith(":"), line
            target = line.rsplit(" -j ", 1)[-1].split()[0] if " -j " in line else ""
            if target.startswith("KUBE-"):
                assert target in declared, line
        # Quotes come in pairs: every comment is one restore token.
        assert body.count('"') % 2 == 0


def test_output_is_deterministic_whatever_the_frontend_order() -> None:
    frontends = [WEB, *WEB_NODE_PORTS, EMPTY, EMPTY_NODE_PORT]
    assert render_kube_proxy(frontends) == render_kube_proxy(frontends[::-1])


def test_a_rerender_inserts_no_jump_and_deletes_the_chains_no_longer_needed() -> None:
    installed = kube_proxy_chains([WEB])
    fewer = Frontend(VIP, 80, "default/web", "http", BACKENDS[:2])
    text = render_kube_proxy([fewer], installed=installed)
    assert not [line for line in text.splitlines() if line.startswith(("-I ", "-D "))]
    gone = sorted(installed["nat"] - kube_proxy_chains([fewer])["nat"])
    assert len(gone) == 1 and gone[0].startswith("KUBE-SEP-")
    nat = table(text, "nat")
    assert f":{gone[0]} - [0:0]" in nat
    assert nat[-1] == f"-X {gone[0]}"
    assert [line for line in text.splitlines() if line.startswith("-X ")] == [f"-X {gone[0]}"]


def test_removal_takes_out_exactly_the_jumps_and_chains_installed() -> None:
    frontends = [WEB, *WEB_NODE_PORTS, EMPTY]
    installed = kube_proxy_chains(frontends)
    text = remove_kube_proxy_text(installed)
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith(("-A ", "-I ", "-F"))]
    deleted = [line[3:] for line in lines if line.startswith("-D ")]
    assert deleted == [f"{j.builtin} {j.spec()}" for j in JUMPS]
    for name in ("mangle", "filter", "nat"):
        body = table(text, name)
        removed = {line[3:] for line in body if line.startswith("-X ")}
        flushed = {line[1:].split()[0] for line in body if line.startswith(":")}
        assert removed == flushed == installed[name]
        # Jumps go before their chains are deleted.
        first_x = next(i for i, line in enumerate(body) if line.startswith("-X "))
        assert all(i < first_x for i, line in enumerate(body) if line.startswith("-D "))
    assert remove_kube_proxy_text({}) == ""


def test_chains_not_kube_proxys_are_refused() -> None:
    assert is_kube_proxy_chain("nat", "KUBE-SEP-2422Y4UT42X3LJXA")
    assert not is_kube_proxy_chain("filter", "KUBE-SEP-2422Y4UT42X3LJXA")
    assert not is_kube_proxy_chain("nat", "STEER-NAT")
    assert all(is_kube_proxy_chain(t, c) for t, chains in FIXED_CHAINS.items() for c in chains)
    with pytest.raises(ValueError, match="STEER-NAT"):
        remove_kube_proxy_text({"nat": {"STEER-NAT"}})
    with pytest.raises(ValueError, match="KUBE-FIREWALL"):
        render_kube_proxy([WEB], installed={"filter": {"KUBE-FIREWALL"}})


def test_a_name_that_would_break_the_comment_is_refused() -> None:
    bad = Frontend(VIP, 80, 'default/we"b', "http", BACKENDS)
    with pytest.raises(ValueError, match="not a Kubernetes name"):
        render_kube_proxy([bad])


def test_comments_are_dropped_from_endpoint_chains_above_1000_endpoints() -> None:
    many = tuple(Backend(IPv4Address(int(IPv4Address("10.244.0.0")) + i), 80) for i in range(1001))
    text = render_kube_proxy([Frontend(VIP, 80, "default/big", "", many)])
    svc = chain_of(text, "KUBE-SVC-")
    assert all("comment" not in line for line in rules(text, "nat", svc))
    sep_rules = [line for line in text.splitlines() if line.startswith("-A KUBE-SEP-")]
    assert len(sep_rules) == 2002
    assert all("comment" not in line for line in sep_rules)
    # The KUBE-SERVICES rules keep theirs.
    assert '"default/big cluster IP"' in text
