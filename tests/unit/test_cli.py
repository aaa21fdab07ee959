"""The command line's own behaviour: --version, help texts, and `steer agent --dry-run`
where no lab is up (a one-line error with its fix, or a plan against no pods)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from steer import cli
from steer.node import iptables, netns
from steer.render.iptables import KernelState


@pytest.fixture
def no_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Inputs for `steer agent`: an empty policy directory and a lab state that does not
    exist; no named network namespace at all (so not the lab's node either)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    monkeypatch.setattr(netns, "NETNS_RUN_DIR", tmp_path / "netns")
    # The dry run reads the node's iptables when it can; make that an empty node, so the
    # test neither needs nor depends on the kernel.
    monkeypatch.setattr(iptables, "read_state", KernelState)
    # main() refuses `agent` to non-root callers before anything else; these tests are about
    # what comes after, which (as a dry run) needs no privilege.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    return ["--policies", str(policies), "--lab-state", str(tmp_path / "absent" / "lab.json")]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"steer {version('steer')}\n"


def test_agent_help_names_both_datapaths() -> None:
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "agent the node agent: both datapaths, eBPF and iptables" in help_text


def test_agent_dry_run_without_lab_node_namespace(
    no_lab: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["agent", "--dry-run", *no_lab])  # --netns defaults to steer-node
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("error: no lab node namespace steer-node")
    assert "fix: steer lab up, or pass --netns ''" in line


def test_agent_dry_run_without_named_namespace(
    no_lab: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["agent", "--dry-run", "--netns", "elsewhere", *no_lab])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 1
    assert line.startswith("error: no lab node namespace elsewhere")


def test_agent_dry_run_in_current_namespace_plans_against_no_pods(
    no_lab: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["agent", "--dry-run", "--netns", "", *no_lab])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    # The kernel calls one sync would make: an atomic restore, table by table, then the
    # read-back of what it wrote.
    lines = captured.out.splitlines()
    # IPv6 first (steered pods' IPv6 TCP is refused), then the IPv4 rules.
    assert lines[0] == "ip6tables-restore --noflush"
    ipv4 = lines.index("iptables-restore --noflush")
    assert lines[ipv4 + 1] == "  *mangle"
    assert "  COMMIT" in lines[ipv4:]
    assert any(line.startswith("iptables read-back") for line in lines[ipv4:])
    # Then the flows whose verdicts the rules may change (all of them on a first sync).
    assert lines[-1] == "conntrack dump marked"


def test_commands_work_without_matplotlib(tmp_path: Path) -> None:
    """matplotlib is the optional `bench` extra: steer's modules import without it, the
    commands that do not plot run without it, and plotting says how to get it."""
    script = textwrap.dedent(
        f"""
        import argparse, contextlib, importlib, io, pkgutil, sys
        sys.modules["matplotlib"] = None  # import matplotlib raises ImportError
        import steer
        for module in pkgutil.walk_packages(steer.__path__, "steer."):
            importlib.import_module(module.name)
        from steer.cli import build_parser, main
        [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
        commands = [[], *([name] for name in sub.choices)]
        for command in commands:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main([*command, "--help"])
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["render", "crd"]) == 0
            assert main(["render", "xds", "--policies", {str(tmp_path)!r},
                         "--lab-state", {str(tmp_path / "lab.json")!r}]) == 0
        assert out.getvalue()
        from steer.bench.plots import PlotError, new_figure
        try:
            new_figure()
        except PlotError as exc:
            assert "pip install 'steer[bench]'" in str(exc), exc
        else:
            raise AssertionError("plotted without matplotlib")
        assert sys.modules["matplotlib"] is None
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
