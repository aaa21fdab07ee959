"""Envoy's bootstrap: identity, admin on a Unix socket, and ADS to the control plane.

Everything else (listeners, routes, clusters) arrives over xDS. The envoy/ directory holds
the same document rendered for the local node, for operators to read.

Over TCP (a cluster) the xDS connection can be mutual TLS: Envoy presents its node's
client certificate and checks the control plane's against steer's CA and the name it
dialled (`XdsClientTls`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from steer.constants import (
    ALS_CLUSTER,
    ALS_SOCKET,
    ENVOY_ADMIN_ADDRESS,
    ENVOY_ADMIN_SOCKET,
    ENVOY_ADMIN_SOCKET_MODE,
    ENVOY_CLUSTER_ID,
    XDS_CLUSTER_NAME,
)

AdsMode = Literal["sotw", "delta"]
API_TYPES: dict[AdsMode, str] = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@dataclass(frozen=True)
class XdsClientTls:
    """The node's client certificate and key, and the CA that signed the control plane's
    serving certificate. Envoy reads the files when it starts."""

    cert: Path
    key: Path
    ca: Path


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _admin_address(admin: Path | int) -> dict[str, Any]:
    """A path: a Unix socket only its owner can open. A port: TCP on loopback, for tests
    and tools that run an Envoy of their own (0 picks a free port)."""
    if isinstance(admin, Path):
        return {"pipe": {"path": str(admin), "mode": ENVOY_ADMIN_SOCKET_MODE}}
    return {"socket_address": {"address": ENVOY_ADMIN_ADDRESS, "port_value": admin}}


def _upstream_tls(tls: XdsClientTls, host: str) -> dict[str, Any]:
    """mTLS to the control plane: the server must prove the name Envoy dialled (a DNS SAN,
    or an IP SAN for an address) under steer's CA."""
    san_type = "IP_ADDRESS" if _is_ip(host) else "DNS"
    context: dict[str, Any] = {
        "@type": _TLS_CONTEXT,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(tls.cert)},
                    "private_key": {"filename": str(tls.key)},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(tls.ca)},
                "match_typed_subject_alt_names": [
                    {"san_type": san_type, "matcher": {"exact": host}}
                ],
            },
        },
    }
    if san_type == "DNS":
        context["sni"] = host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _http2_only() -> dict[str, Any]:
    """gRPC needs HTTP/2 to the cluster."""
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    return {
        options: {
            "@type": f"type.googleapis.com/{options}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _als_cluster() -> dict[str, Any]:
    """Where every listener streams its access log entries: the agent's ALS server on a
    Unix socket beside Envoy's admin. While the agent is away Envoy drops the entries,
    never a request."""
    return {
        "name": ALS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2_only(),
        "load_assignment": {
            "cluster_name": ALS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(ALS_SOCKET)}}}}]}
            ],
        },
    }


# The stats Envoy keeps: its health, the control plane's and the agent's connections, the
# RBAC filters' verdicts and each listener's request and connection totals. Every other
# stat (histograms of request times, per-host and per-route counters) is a no-op: they
# cost ~6% of Envoy's CPU per request, and steer's own metrics count requests by verdict.
STATS_CONFIG: dict[str, Any] = {
    "stats_matcher": {
        "inclusion_list": {
            "patterns": [
                {"prefix": "server."},
                {"prefix": "cluster_manager."},
                {"prefix": "listener_manager."},
                {"prefix": "control_plane."},
                {"prefix": f"cluster.{XDS_CLUSTER_NAME}."},
                {"prefix": f"cluster.{ALS_CLUSTER}."},
                {"contains": ".rbac."},
                {
                    "safe_regex": {
                        "regex": r"http\.[^.]+\.downstream_(rq_total|rq_[1-5]xx|cx_total|cx_active)"
                    }
                },
            ]
        }
    }
}


def bootstrap(
    node_id: str,
    *,
    xds_socket: Path | None = None,
    xds_address: tuple[str, int] | None = None,
    ads: AdsMode = "delta",
    admin: Path | int = ENVOY_ADMIN_SOCKET,
    xds_tls: XdsClientTls | None = None,
) -> dict[str, Any]:
    """The control plane is reached over a Unix socket in local mode (it crosses network
    namespaces, as a path does; file permissions guard it) and over TCP in a cluster,
    there with mutual TLS when `xds_tls` is given."""
    if (xds_socket is None) == (xds_address is None):
        raise ValueError("give exactly one of xds_socket or xds_address")
    if xds_tls is not None and xds_address is None:
        raise ValueError("xds_tls needs xds_address: the Unix socket is guarded by file modes")
    # A name (the control plane's Service) is resolved by DNS; an address is used as is.
    discovery = "STATIC"
    transport: dict[str, Any] = {}
    if xds_socket is not None:
        endpoint_address: dict[str, Any] = {"pipe": {"path": str(xds_socket)}}
    else:
        assert xds_address is not None
        host, port = xds_address
        endpoint_address = {"socket_address": {"address": host, "port_value": port}}
        if not _is_ip(host):
            discovery = "STRICT_DNS"
        if xds_tls is not None:
            transport["transport_socket"] = _upstream_tls(xds_tls, host)
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": ENVOY_CLUSTER_ID},
        "admin": {"address": _admin_address(admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": API_TYPES[ads],
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER_NAME,
                            # Reconnect within a second of a control-plane restart: the
                            # default backoff (0.5 s doubling to 30 s) made changes wait
                            # up to 4 s after one in the fault drills.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
                            },
                        }
                    }
                ],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads_source,
            "cds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER_NAME,
                    "type": discovery,
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": _http2_only(),
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER_NAME,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": endpoint_address}}]}
                        ],
                    },
                    **transport,
                },
                _als_cluster(),
            ]
        },
        "stats_config": STATS_CONFIG,
        # Pods' sockets are many; Envoy's default overload settings would warn on start.
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"overload": {"global_downstream_max_connections": 100000}},
                },
                # Changes through the admin's /runtime_modify (such as the share of requests
                # logged to the agent, steer.access_log_percent) override the above.
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
