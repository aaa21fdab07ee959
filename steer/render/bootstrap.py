"""Envoy's bootstrap: identity, admin on loopback, and ADS to the control plane.

Everything else (listeners, routes, clusters) arrives over xDS. The envoy/ directory holds
the same document rendered for the local node, for operators to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from steer.constants import (
    ENVOY_ADMIN_ADDRESS,
    ENVOY_ADMIN_PORT,
    ENVOY_CLUSTER_ID,
    XDS_CLUSTER_NAME,
)

AdsMode = Literal["sotw", "delta"]
API_TYPES: dict[AdsMode, str] = {"sotw": "GRPC", "delta": "DELTA_GRPC"}


def bootstrap(
    node_id: str,
    *,
    xds_socket: Path | None = None,
    xds_address: tuple[str, int] | None = None,
    ads: AdsMode = "delta",
    admin_port: int = ENVOY_ADMIN_PORT,
) -> dict[str, Any]:
    """The control plane is reached over a Unix socket in local mode (it crosses network
    namespaces, as a path does) and over TCP in a cluster."""
    if (xds_socket is None) == (xds_address is None):
        raise ValueError("give exactly one of xds_socket or xds_address")
    if xds_socket is not None:
        endpoint_address: dict[str, Any] = {"pipe": {"path": str(xds_socket)}}
    else:
        assert xds_address is not None
        host, port = xds_address
        endpoint_address = {"socket_address": {"address": host, "port_value": port}}
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": ENVOY_CLUSTER_ID},
        "admin": {
            "address": {
                "socket_address": {"address": ENVOY_ADMIN_ADDRESS, "port_value": admin_port}
            }
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": API_TYPES[ads],
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER_NAME}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads_source,
            "cds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER_NAME,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER_NAME,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": endpoint_address}}]}
                        ],
                    },
                }
            ]
        },
        # Pods' sockets are many; Envoy's default overload settings would warn on start.
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"overload": {"global_downstream_max_connections": 100000}},
                }
            ]
        },
    }
