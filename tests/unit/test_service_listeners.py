"""Envoy's per-Service-port listeners: which Service ports get one, and on which port.
The agent and the control plane compute the ports each on its own, so the assignment must
depend on the set of Service ports alone."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from steer.constants import ENVOY_SERVICE_PORTS
from steer.model.enforce import resolve
from steer.model.service import Backend, Frontend
from steer.model.servicepolicy import is_envoy_port, service_listener_ports, service_listeners
from tests.samples import API, PODS, WEB, sample_policies

KEYS = st.lists(
    st.tuples(
        st.from_regex(r"[a-z]{1,3}/[a-z]{1,3}", fullmatch=True), st.sampled_from(["", "http"])
    ),
    max_size=40,
)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(KEYS, st.randoms(use_true_random=False))
def test_ports_depend_on_the_set_of_service_ports_alone(
    keys: list[tuple[str, str]], shuffle: random.Random
) -> None:
    ports = service_listener_ports(keys)
    shuffled = list(keys) * 2
    shuffle.shuffle(shuffled)
    assert service_listener_ports(shuffled) == ports
    assert set(ports) == set(keys)
    assert len(set(ports.values())) == len(ports), "two Service ports share a listener"
    assert all(port in ENVOY_SERVICE_PORTS for port in ports.values())


def test_a_service_coming_moves_no_port_it_does_not_collide_with() -> None:
    keys = [(f"default/svc-{i}", "http") for i in range(50)]
    before = service_listener_ports(keys)
    after = service_listener_ports([*keys, ("default/new", "http")])
    moved = [k for k in keys if before[k] != after[k]]
    # Only a key probing past the newcomer's port can move, and with 900 ports, none does.
    assert moved == []


def test_beyond_the_range_a_service_port_gets_no_listener() -> None:
    keys = [(f"default/svc-{i}", "") for i in range(5)]
    ports = service_listener_ports(keys, ports=range(20000, 20003))
    assert len(ports) == 3
    assert sorted(ports.values()) == [20000, 20001, 20002]


def test_only_service_ports_whose_backends_need_envoy_get_a_listener() -> None:
    """web:8080 has HTTP rules (sample policies), api:7000 only L4 ones: web's Service port
    gets a listener with its backends, shared by its ClusterIP and NodePort frontends."""
    enforcement = resolve(sample_policies(), PODS)
    web = Frontend(
        IPv4Address("10.96.0.10"), 80, "default/web", "http", (Backend(IPv4Address(WEB.ip), 8080),)
    )
    node_port = Frontend(
        IPv4Address("10.244.0.1"),
        30080,
        "default/web",
        "http",
        (Backend(IPv4Address(WEB.ip), 8080),),
        node_port=True,
    )
    api = Frontend(
        IPv4Address("10.96.0.11"), 7000, "default/api", "", (Backend(IPv4Address(API.ip), 7000),)
    )
    listeners = service_listeners(enforcement, [web, node_port, api])
    assert list(listeners) == [("default/web", "http")]
    listener = listeners["default/web", "http"]
    assert listener.backends == (IPv4Address(WEB.ip),)
    assert listener.name == f"steer-svc-{listener.envoy_port}"
    assert is_envoy_port(listener.envoy_port)
