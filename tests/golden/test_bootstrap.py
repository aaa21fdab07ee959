"""The committed Envoy bootstrap matches the renderer, and Envoy accepts it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from steer.constants import LAB_NODE_NAME, XDS_SOCKET
from steer.node.envoy import envoy_binary
from steer.render.bootstrap import bootstrap

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
