"""The local node as one handle: lab, control plane, agent and Envoy as real processes.

`steer demo` and the end-to-end tests both drive the node through this, exactly as an
operator would run it: separate `steer control`, `steer agent` and `steer envoy` processes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from steer.atomicfile import write_text_atomic
from steer.constants import AGENT_STATUS_FILE, CONTROL_STATUS_FILE, LOG_DIR, POLICY_DIR
from steer.lab.process import supervised
from steer.lab.services import LabService, default_lab_services
from steer.lab.spec import LabPodSpec, LabState, default_lab_specs
from steer.lab.updown import lab_down, lab_up
from steer.node.bpfobjects import BpfObjects
from steer.node.envoy import wait_ready
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns
from steer.source.local import directory_texts, texts_digest


def _steer(*args: str) -> list[str]:
    return [sys.executable, "-m", "steer.cli", *args]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def envoy_has_current(control: Mapping[str, Any]) -> bool:
    """The control plane's status says Envoy ACKed the node's current snapshot: every
    type's version, not just what was sent (a status written between a reload and its
    push shows the old snapshot sent and ACKed)."""
    current = control.get("current") or {}
    acked = control.get("acked") or {}
    return bool(current) and all(acked.get(t) == v for t, v in current.items())


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document


def sample_policy_texts() -> dict[str, str]:
    return {
        entry.name: entry.read_text()
        for entry in resources.files("steer.samples").iterdir()
        if entry.name.endswith(".yaml")
    }


class LocalNode:
    """A running local node. Use `start()` as a context manager."""

    def __init__(self, lab: LabState, policy_dir: Path, specs: list[LabPodSpec]) -> None:
        self.lab = lab
        self.policy_dir = policy_dir
        self.specs = specs
        self._written_at = 0.0

    def set_annotations(self, pod: str, annotations: Mapping[str, str]) -> None:
        """Change a pod's annotations, as an operator would, and wait until the agent has
        acted on them."""
        self.specs = [
            replace(s, annotations={**s.annotations, **annotations}) if s.name == pod else s
            for s in self.specs
        ]
        started = time.time()
        self.lab = lab_up(self.specs)
        wait_for(
            lambda: (read_status(AGENT_STATUS_FILE) or {}).get("loaded_at", 0) >= started,
            15,
            f"the agent to act on {pod}'s new annotations",
        )

    def dataplane_of(self, pod: str, namespace: str = "default") -> str:
        status = read_status(AGENT_STATUS_FILE) or {}
        return next(
            (
                str(p["dataplane"])
                for p in status.get("pods", [])
                if (p["namespace"], p["name"]) == (namespace, pod)
            ),
            "unknown",
        )

    def netns(self, pod: str, namespace: str = "default") -> str:
        return self.lab.pod(namespace, pod).netns

    def ip(self, pod: str, namespace: str = "default") -> str:
        return self.lab.pod(namespace, pod).ip

    def write_policies(self, texts: Mapping[str, str], *, replace: bool = True) -> None:
        """Put policy files in place, each whole (by rename, as operators should); with
        replace, every other policy file goes."""
        existing = self.policy_dir.glob("*.y*ml") if replace else ()
        going = [path for path in existing if path.name not in texts]
        if not (going or texts):
            return  # nothing changes, so nothing is loaded again to wait for
        self._written_at = time.time()
        for path in going:
            path.unlink()
        for name, text in texts.items():
            write_text_atomic(self.policy_dir / name, text)

    def synced(self) -> bool:
        """Agent and control plane run the directory's current policies, Envoy ACKed them."""
        want = texts_digest(directory_texts(self.policy_dir))
        agent, control = read_status(AGENT_STATUS_FILE), read_status(CONTROL_STATUS_FILE)
        if agent is None or control is None:
            return False
        # Both must also have loaded the directory since the last write: rewriting the
        # content already in force leaves the digests as they were.
        return (
            agent.get("policy_digest") == want
            and agent.get("loaded_at", 0) >= self._written_at
            and control.get("loaded_at", 0) >= self._written_at
            and agent.get("ruleset_digest") is not None
            and control.get("policy_digest") == want
            and envoy_has_current(control)
        )

    # Generous: a healthy node catches up in well under a second, but a loaded 2-core CI
    # machine once took more than 15 s for the first sync after a start.
    def wait_synced(self, timeout: float = 60.0) -> None:
        wait_for(self.synced, timeout, "agent, control plane and Envoy to catch up")

    @classmethod
    @contextmanager
    def start(
        cls,
        specs: list[LabPodSpec] | None = None,
        policies: Mapping[str, str] | None = None,
        services: Sequence[LabService] | None = None,
        ads: str = "delta",
        keep: bool = False,
    ) -> Iterator[LocalNode]:
        lab_down()
        for stale in (AGENT_STATUS_FILE, CONTROL_STATUS_FILE):
            stale.unlink(missing_ok=True)
        specs = specs if specs is not None else default_lab_specs()
        lab = lab_up(specs, services=services if services is not None else default_lab_services())
        try:
            shutil.rmtree(POLICY_DIR, ignore_errors=True)
            POLICY_DIR.mkdir(parents=True)
            node = cls(lab, POLICY_DIR, specs)
            node.write_policies(policies if policies is not None else sample_policy_texts())
            with ExitStack() as stack:
                policy_arg = ("--policies", str(POLICY_DIR))
                for name, argv in (
                    ("control", _steer("control", *policy_arg)),
                    ("agent", _steer("agent", *policy_arg)),
                    ("envoy", _steer("envoy", "--ads", ads)),
                ):
                    # Every process of the node starts in the node's namespace (the agent
                    # and Envoy would enter it anyway; the control plane needs only its Unix
                    # socket), so `steer lab down`, which kills what is in the lab's
                    # namespaces, stops them all, also when this process is gone (--keep,
                    # or killed outright).
                    stack.enter_context(
                        supervised(
                            argv,
                            LOG_DIR / f"{name}.log",
                            netns=lab.node_netns,
                            outlive_parent=keep,
                        )
                    )
                run_in_netns(lab.node_netns, wait_ready)
                node.wait_synced()
                yield node
                if keep:
                    stack.pop_all()
        finally:
            if not keep:
                # The agent has stopped: nothing holds the BPF objects any more.
                BpfObjects.unload_all(HostKernel())
                lab_down()
