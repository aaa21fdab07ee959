"""`steer status` on temporary status files: exit 1 when no agent runs (the agent is what
enforces), 0 otherwise; every absence printed with its fix; a file left behind by a
stopped process, or one that is not a status document, reported without a traceback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from steer import cli
from steer.node.agent import StatusWriter

AGENT_DOC: dict[str, Any] = {
    "pods": [
        {
            "name": "web",
            "namespace": "default",
            "ip": "10.244.0.3",
            "dataplane": "iptables",
            "reason": "annotation steer.dev/dataplane=iptables",
            "ebpf_counters": None,
        }
    ],
    "features": {"ebpf": False},
    "ipv6": "refused",
    "last_sync": {"applied": True, "errors": ["web.yaml: spec.ingress: bad"]},
    "ruleset_digest": "abc",
    "loaded_at": 0.0,
    "loop_errors": 0,
    "mode": "local",
}
CONTROL_DOC: dict[str, Any] = {
    "node": "lab-node",
    "streams": 1,
    "pushes": 4,
    "acks": 4,
    "nacks": 0,
    "last_nack": None,
    "errors": [],
    "quarantined": [],
}


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    found = {
        "agent": tmp_path / "agent-status.json",
        "control": tmp_path / "control-status.json",
        "socket": tmp_path / "xds.sock",
    }
    monkeypatch.setattr(cli, "STATUS_AGENT_FILE", found["agent"])
    monkeypatch.setattr(cli, "STATUS_CONTROL_FILE", found["control"])
    monkeypatch.setattr(cli, "STATUS_XDS_SOCKET", found["socket"])
    return found


@pytest.fixture
def live_agent(paths: dict[str, Path]) -> Iterator[StatusWriter]:
    """An agent's status file, with its lock held as a running agent holds it."""
    writer = StatusWriter(paths["agent"])
    writer.write({**AGENT_DOC, "loaded_at": time.time() - 5})
    yield writer
    writer.close()


@pytest.fixture
def live_control(paths: dict[str, Path]) -> Iterator[None]:
    paths["control"].write_text(json.dumps(CONTROL_DOC))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(paths["socket"]))
        server.listen()
        yield


def status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["status", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_nothing_running_exits_1_and_says_how_to_start_each(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = status(capsys)
    assert code == 1
    assert f"agent: not running or unknown (no status file {paths['agent']}); fix:" in out
    assert "steer agent" in out
    assert "control plane: not running or unknown" in out
    assert "steer control" in out


def test_agent_and_control_plane_running_exit_0_and_show_pods(
    paths: dict[str, Path],
    live_agent: StatusWriter,
    live_control: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = status(capsys)
    assert code == 0, out
    assert "agent: running, local, last sync 5 s ago" in out
    assert "default/web" in out and "iptables" in out
    assert "error: web.yaml: spec.ingress: bad" in out
    assert "control plane: node lab-node streams=1 pushes=4 acks=4 nacks=0" in out
    assert "fix:" not in out


def test_agent_without_control_plane_exits_0_and_names_the_missing_one(
    paths: dict[str, Path], live_agent: StatusWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = status(capsys)
    assert code == 0, out
    assert "default/web" in out
    assert "control plane: not running or unknown" in out and "fix:" in out


def test_control_plane_without_agent_exits_1(
    paths: dict[str, Path], live_control: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = status(capsys)
    assert code == 1
    assert "agent: not running" in out
    assert "control plane: node lab-node" in out


def test_a_file_left_by_a_stopped_agent_is_not_running(
    paths: dict[str, Path],
    live_agent: StatusWriter,
    live_control: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    live_agent.close()  # the kernel drops the lock when the agent dies, even on kill -9
    code, out = status(capsys)
    assert code == 1
    assert f"agent: not running ({paths['agent']} was left by an agent that has stopped" in out
    assert "last sync was 5 s ago" in out
    assert "default/web" not in out


def test_a_file_left_by_a_stopped_control_plane_is_not_running(
    paths: dict[str, Path], live_agent: StatusWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    paths["control"].write_text(json.dumps(CONTROL_DOC))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(paths["socket"]))
    stale.close()  # the socket file stays, nothing listens: connect is refused
    code, out = status(capsys)
    assert code == 0
    assert f"nothing listens on {paths['socket']}" in out
    assert "pushes=4" not in out


def test_a_document_from_an_agent_that_names_no_lock_is_trusted(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    paths["agent"].write_text(json.dumps(AGENT_DOC))
    code, out = status(capsys)
    assert code == 0, out
    assert "default/web" in out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "is not a status document (Expecting property name"),
        ("[]", "is not a status document (not a JSON object)"),
        ('{"features": {}}', "has no list of pods"),
    ],
)
def test_an_unreadable_agent_file_is_reported_without_a_traceback(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    paths["agent"].write_text(text)
    code, out = status(capsys)
    assert code == 1
    assert problem in out
    assert "fix: remove it" in out
    assert "Traceback" not in out


def test_an_agent_file_that_cannot_be_read_is_reported(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    paths["agent"].mkdir()  # reading it fails with EISDIR
    code, out = status(capsys)
    assert code == 1
    assert f"cannot read {paths['agent']}: Is a directory" in out
    assert "fix: remove it" in out


def test_an_agent_file_this_user_may_not_read_says_run_as_root(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths["agent"].write_text(json.dumps(AGENT_DOC))

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    code, out = status(capsys)
    assert code == 1
    assert f"cannot read {paths['agent']}: Permission denied; fix: run steer status as root" in out


def test_an_unreadable_control_file_does_not_hide_the_agent(
    paths: dict[str, Path], live_agent: StatusWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    paths["control"].write_text('{"node": ')
    code, out = status(capsys)
    assert code == 0
    assert "default/web" in out
    assert "control plane: not running or unknown" in out and "is not a status document" in out


def test_in_a_cluster_the_control_plane_is_not_looked_for_on_the_node(
    paths: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    writer = StatusWriter(paths["agent"])
    pod = {**AGENT_DOC["pods"][0], "readiness_gate": "waiting: Envoy does not serve"}
    writer.write(
        {**AGENT_DOC, "pods": [pod], "mode": "kubernetes", "node": "worker-2", "gates_waiting": 1}
    )
    try:
        code, out = status(capsys)
        json_code, json_out = status(capsys, "--json")
    finally:
        writer.close()
    assert code == 0, out
    assert "agent: running, node worker-2 (kubernetes)" in out
    assert "1 readiness gate(s) waiting" in out
    assert "readiness gate: waiting: Envoy does not serve" in out
    assert "kubectl get httppolicies" in out
    assert json_code == 0
    assert json.loads(json_out)["problems"] == []


def test_json_has_both_documents_the_problems_and_the_same_exit_code(
    paths: dict[str, Path], live_control: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = status(capsys, "--json")
    assert code == 1
    document = json.loads(out)
    assert set(document) == {"agent", "control", "problems"}
    assert document["agent"] is None
    assert document["control"]["node"] == "lab-node"
    [problem] = document["problems"]
    assert problem.startswith("agent: not running") and "fix:" in problem
