"""The committed Envoy bootstrap matches the renderer, and Envoy accepts it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from steer.constants import (
    ALS_CLUSTER,
    ALS_SOCKET,
    ENVOY_ADMIN_SOCKET,
    LAB_NODE_NAME,
    XDS_NODE_TLS_DIR,
    XDS_SOCKET,
)
from steer.control.certs import NODES_DIR, generate
from steer.node.envoy import envoy_binary
from steer.render.bootstrap import XdsClientTls, bootstrap

COMMITTED = Path(__file__).parents[2] / "envoy" / "bootstrap-local.json"


def rendered() -> str:
    return json.dumps(bootstrap(LAB_NODE_NAME, xds_socket=XDS_SOCKET), indent=2) + "\n"


def test_committed_bootstrap_is_current() -> None:
    if os.environ.get("STEER_REGEN_GOLDEN"):
        COMMITTED.write_text(rendered())
    assert COMMITTED.read_text() == rendered(), "stale; run make golden"


@pytest.mark.envoy
def test_envoy_validates_the_bootstrap() -> None:
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(COMMITTED), "--base-id", "7919"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("ads, api_type", [("sotw", "GRPC"), ("delta", "DELTA_GRPC")])
def test_ads_mode_selects_the_api_type(ads: str, api_type: str) -> None:
    config = bootstrap("n", xds_address=("10.0.0.1", 15010), ads=ads)  # type: ignore[arg-type]
    assert config["dynamic_resources"]["ads_config"]["api_type"] == api_type
    address = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    assert (
        address["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 15010
    )


def test_exactly_one_xds_endpoint_is_required() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        bootstrap("n")


def test_admin_is_a_private_unix_socket() -> None:
    admin = bootstrap(LAB_NODE_NAME, xds_socket=XDS_SOCKET)["admin"]
    assert admin == {"address": {"pipe": {"path": str(ENVOY_ADMIN_SOCKET), "mode": 0o600}}}
    # A test running its own Envoy may still put the admin on a loopback port.
    tcp = bootstrap("n", xds_socket=XDS_SOCKET, admin=0)["admin"]["address"]
    assert tcp == {"socket_address": {"address": "127.0.0.1", "port_value": 0}}


NODE_TLS = XdsClientTls(
    XDS_NODE_TLS_DIR / "tls.crt", XDS_NODE_TLS_DIR / "tls.key", XDS_NODE_TLS_DIR / "ca.crt"
)


def xds_cluster(config: dict[str, Any]) -> dict[str, Any]:
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "steer-xds"]
    return cluster  # type: ignore[no-any-return]


def test_access_logs_go_to_the_agent_over_a_unix_socket() -> None:
    clusters = bootstrap(LAB_NODE_NAME, xds_socket=XDS_SOCKET)["static_resources"]["clusters"]
    [als] = [c for c in clusters if c["name"] == ALS_CLUSTER]
    [endpoint] = als["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": str(ALS_SOCKET)}}


def test_xds_over_tcp_presents_the_node_certificate_and_checks_the_servers_name() -> None:
    host = "steer-control.steer-system.svc"
    cluster = xds_cluster(bootstrap("node-a", xds_address=(host, 15010), xds_tls=NODE_TLS))
    assert cluster["type"] == "STRICT_DNS"  # a Service name, resolved by cluster DNS
    socket = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["sni"] == host
    common = context["common_tls_context"]
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(XDS_NODE_TLS_DIR / "tls.crt")},
            "private_key": {"filename": str(XDS_NODE_TLS_DIR / "tls.key")},
        }
    ]
    assert common["validation_context"] == {
        "trusted_ca": {"filename": str(XDS_NODE_TLS_DIR / "ca.crt")},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
    }
    assert common["alpn_protocols"] == ["h2"]


def test_xds_to_an_address_checks_an_ip_san_and_stays_static() -> None:
    cluster = xds_cluster(bootstrap("n", xds_address=("10.0.0.1", 15010), xds_tls=NODE_TLS))
    assert cluster["type"] == "STATIC"
    context = cluster["transport_socket"]["typed_config"]
    assert "sni" not in context
    assert context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.1"}}
    ]


def test_plain_tcp_and_the_unix_socket_carry_no_tls() -> None:
    assert "transport_socket" not in xds_cluster(bootstrap("n", xds_address=("10.0.0.1", 1)))
    assert "transport_socket" not in xds_cluster(bootstrap("n", xds_socket=XDS_SOCKET))
    with pytest.raises(ValueError, match="file modes"):
        bootstrap("n", xds_socket=XDS_SOCKET, xds_tls=NODE_TLS)


@pytest.mark.envoy
def test_envoy_validates_the_mtls_bootstrap(tmp_path: Path) -> None:
    generate("steer-control", "steer-system", tmp_path, xds=True, nodes=["node-a"])
    node = tmp_path / NODES_DIR / "node-a"
    tls = XdsClientTls(node / "tls.crt", node / "tls.key", node / "ca.crt")
    config = tmp_path / "envoy.json"
    document = bootstrap(
        "node-a",
        xds_address=("steer-control.steer-system.svc", 15010),
        xds_tls=tls,
        admin=tmp_path / "admin.sock",
    )
    config.write_text(json.dumps(document))
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--base-id", "7920"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
