"""How much of the kernel's iptables a change reads and writes (on the recording kernel)."""

from __future__ import annotations

from steer.node.datapath import IptablesDatapath, SyncReport, apply_ruleset
from steer.node.fakekernel import RecordingKernel
from steer.node.iptables import IptablesError
from steer.render.iptables import Jump, render_ruleset
from tests.samples import CLIENT, PODS, WEB, sample_enforcement


def _restored_chains(kernel: RecordingKernel) -> list[str]:
    return [line.split()[0][1:] for line in kernel.calls if line.startswith("  :")]


def test_a_change_writes_only_changed_chains_and_reads_nothing() -> None:
    kernel = RecordingKernel()
    first = render_ruleset(sample_enforcement())
    apply_ruleset(kernel, first)
    assert any("read-back" in line for line in kernel.calls)
    kernel.calls.clear()
    kernel.state_reads = 0
    second = render_ruleset(sample_enforcement((CLIENT, WEB)))
    apply_ruleset(kernel, second, first)
    assert kernel.state_reads == 0
    assert not any("read-back" in line for line in kernel.calls)
    assert len(_restored_chains(kernel)) < len(second.chains["mangle"])


def _applied(kernel: RecordingKernel) -> IptablesDatapath:
    datapath = IptablesDatapath(kernel)
    datapath.apply(sample_enforcement(), frozenset(), SyncReport(False, 0, 0, 0.0))
    assert datapath.applied is not None
    return datapath


def test_a_chain_deleted_by_another_tool_is_found_and_everything_written_again() -> None:
    """Another tool deleted one of steer's chains: the drift check finds it, and the next
    sync cannot trust what this process applied last, so it rewrites everything and reads
    it back."""
    kernel = RecordingKernel()
    datapath = _applied(kernel)
    assert datapath.applied is not None
    victim = next(c for c in datapath.applied.chains["mangle"] if c.startswith("STEER-I-"))
    assert not datapath.drifted()
    kernel.chains["mangle"].discard(victim)
    assert datapath.drifted()
    assert datapath.repairs == 1
    kernel.calls.clear()
    datapath.apply(sample_enforcement(PODS), frozenset(), SyncReport(False, 0, 0, 0.0))
    assert datapath.applied is not None
    assert victim in _restored_chains(kernel)
    assert set(datapath.applied.chains["mangle"]) <= set(_restored_chains(kernel))
    assert any("read-back" in line for line in kernel.calls)
    assert not datapath.drifted()


def test_a_missing_entry_jump_is_found_and_put_back() -> None:
    kernel = RecordingKernel()
    datapath = _applied(kernel)
    assert datapath.applied is not None
    jump = datapath.applied.jumps[0]
    kernel.jumps.discard(jump)
    assert datapath.drifted()
    kernel.calls.clear()
    datapath.apply(sample_enforcement(), frozenset(), SyncReport(False, 0, 0, 0.0))
    assert any(line.startswith(f"  -I {jump.builtin} 1") for line in kernel.calls)
    assert jump in kernel.jumps


class _FailsOnce(RecordingKernel):
    def iptables_restore(self, text: str, *, ipv6: bool = False) -> None:
        if not ipv6 and not getattr(self, "failed", False):
            self.failed = True
            raise IptablesError("iptables-legacy-restore: Couldn't load target `STEER-I-x'")
        super().iptables_restore(text, ipv6=ipv6)


def test_a_change_that_fails_on_trust_is_written_again_whole() -> None:
    """What this process applied last may be stale between two drift checks (a chain a
    written rule jumps to was deleted): the failed commit changed nothing, and a full
    rewrite, read back, follows at once."""
    kernel = RecordingKernel()
    first = render_ruleset(sample_enforcement())
    apply_ruleset(kernel, first)
    failing = _FailsOnce(chains=kernel.chains, jumps=kernel.jumps)
    second = render_ruleset(sample_enforcement(PODS))
    apply_ruleset(failing, second, first)
    assert failing.state_reads == 1
    assert set(second.chains["mangle"]) <= set(_restored_chains(failing))
    assert any("read-back" in line for line in failing.calls)


def test_a_jump_another_tool_got_ahead_of_is_moved_back_to_the_top() -> None:
    from steer.render.iptables import KernelState, render_ruleset, restore_text
    from tests.samples import sample_enforcement

    ruleset = render_ruleset(sample_enforcement())
    forward = next(j for j in ruleset.jumps if (j.table, j.builtin) == ("filter", "FORWARD"))
    current = KernelState(
        chains={t: frozenset(c) for t, c in ruleset.chains.items()},
        jumps=frozenset(ruleset.jumps),
        misplaced=frozenset({forward}),
    )
    lines = restore_text(ruleset, current).splitlines()
    delete, insert = f"-D FORWARD {forward.spec()}", f"-I FORWARD 1 {forward.spec()}"
    assert lines.index(delete) < lines.index(insert)
    # Only that table is written, and only the misplaced jump moves.
    assert [line for line in lines if line.startswith(("-D", "-I"))] == [delete, insert]


def test_the_drift_check_reads_the_tables_only_when_their_fingerprint_moved() -> None:
    """Reading every chain costs ~150 ms on a node with kube-proxy's 5,000 Services: while
    the tables' fingerprint stays as it was at the last read that found steer's chains in
    place, the check trusts that read; the every-rule check always reads."""
    kernel = RecordingKernel()
    datapath = _applied(kernel)
    assert not datapath.drifted()
    reads = kernel.state_reads
    assert not datapath.drifted()
    assert kernel.state_reads == reads
    # Another tool's jump: the fingerprint moves, steer's chains and jumps stay.
    kernel.jumps.add(Jump("nat", "PREROUTING", "KUBE-SERVICES"))
    assert not datapath.drifted()
    assert kernel.state_reads == reads + 1
    assert not datapath.drifted(every_rule=True)
    assert kernel.state_reads == reads + 3  # IPv4 and IPv6
    jump = datapath.applied.jumps[0] if datapath.applied else None
    assert jump is not None
    kernel.jumps.discard(jump)
    assert datapath.drifted()
