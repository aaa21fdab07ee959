"""Markers that skip (pyproject.toml declares them), each exactly what it says:

- `privileged`: needs root (namespaces, iptables, cgroups, BPF); skipped when not root.
- `envoy`: needs the Envoy binary, found the way steer finds it (`envoy_binary`: beside
  the interpreter, else on PATH); skipped where there is none.
"""

from __future__ import annotations

import os

import pytest

from steer.node.envoy import EnvoyError, envoy_binary


def _envoy_missing() -> str | None:
    try:
        envoy_binary()
    except EnvoyError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    not_root = os.geteuid() != 0
    no_envoy = _envoy_missing()
    for item in items:
        if not_root and item.get_closest_marker("privileged"):
            item.add_marker(pytest.mark.skip(reason="needs root"))
        if no_envoy and item.get_closest_marker("envoy"):
            item.add_marker(pytest.mark.skip(reason=no_envoy))
