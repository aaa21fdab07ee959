"""How much of the kernel's iptables a change reads and writes (on the recording kernel)."""

from __future__ import annotations

from steer.node.datapath import apply_ruleset
from steer.node.fakekernel import RecordingKernel
from steer.render.iptables import render_ruleset
from tests.samples import CLIENT, PODS, WEB, sample_enforcement


def _restored_chains(kernel: RecordingKernel) -> list[str]:
    return [line.split()[0][1:] for line in kernel.calls if line.startswith("  :")]


def test_a_change_writes_only_changed_chains_and_reads_nothing_back() -> None:
    kernel = RecordingKernel()
    first = render_ruleset(sample_enforcement())
    apply_ruleset(kernel, first)
    assert any("read-back" in line for line in kernel.calls)
    kernel.calls.clear()
    second = render_ruleset(sample_enforcement((CLIENT, WEB)))
    apply_ruleset(kernel, second, first)
    assert not any("read-back" in line for line in kernel.calls)
    assert len(_restored_chains(kernel)) < len(second.chains["mangle"])


def test_chains_changed_behind_its_back_are_all_written_again_and_read_back() -> None:
    """Another tool deleted one of steer's chains: the next change cannot trust what this
    process applied last, so it rewrites everything and checks it."""
    kernel = RecordingKernel()
    first = render_ruleset(sample_enforcement())
    apply_ruleset(kernel, first)
    victim = next(c for c in first.chains["mangle"] if c.startswith("STEER-I-"))
    kernel.chains["mangle"].discard(victim)
    kernel.calls.clear()
    second = render_ruleset(sample_enforcement(PODS))
    apply_ruleset(kernel, second, first)
    assert victim in _restored_chains(kernel)
    assert set(second.chains["mangle"]) <= set(_restored_chains(kernel))
    assert any("read-back" in line for line in kernel.calls)


def test_a_missing_entry_jump_is_put_back() -> None:
    kernel = RecordingKernel()
    first = render_ruleset(sample_enforcement())
    apply_ruleset(kernel, first)
    jump = first.jumps[0]
    kernel.jumps.discard(jump)
    kernel.calls.clear()
    apply_ruleset(kernel, first, first)
    assert any(line.startswith(f"  -I {jump.builtin} 1") for line in kernel.calls)
    assert jump in kernel.jumps
