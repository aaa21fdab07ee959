"""The thin adapter between a rendered Ruleset and the kernel's (legacy) iptables.

Writes go through `iptables-legacy-restore --noflush`, so each table changes in one
atomic commit; reads go through python-iptables. Everything acts on the calling thread's
network namespace: callers enter the node namespace first.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import iptc

from steer.constants import CHAIN_PREFIX, COMMENT_PREFIX
from steer.render.iptables import (
    TABLES,
    Jump,
    KernelState,
    Ruleset,
    comment_token,
)

log = logging.getLogger("steer.iptables")
RESTORE = "iptables-legacy-restore"
SAVE = "iptables-legacy-save"
RESTORE6 = "ip6tables-legacy-restore"
SAVE6 = "ip6tables-legacy-save"
# iptables-save quotes every comment.
_COMMENT = re.compile(r'--comment "?([^" ]+)"?')


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class RuleCounters:
    comment: str
    packets: int
    bytes: int


def _table(name: str) -> iptc.Table:
    table = iptc.Table(name)
    # python-iptables caches one handle per table, opened in whichever namespace first
    # asked; refresh so reads see the calling thread's namespace and current rules.
    table.refresh()
    return table


def _comment_of(rule: iptc.Rule) -> str:
    for match in rule.matches:
        if match.name == "comment":
            return str(match.comment).removeprefix(COMMENT_PREFIX)
    return ""


def read_state() -> KernelState:
    try:
        return _read_state({name: _table(name) for name in TABLES})
    except iptc.IPTCError as exc:
        raise IptablesError(f"reading steer's iptables chains failed: {exc}") from exc


def _read_state(tables: Mapping[str, iptc.Table]) -> KernelState:
    chains: dict[str, frozenset[str]] = {}
    jumps: set[Jump] = set()
    misplaced: set[Jump] = set()
    for name, table in tables.items():
        owned = frozenset(c.name for c in table.chains if c.name.startswith(CHAIN_PREFIX))
        chains[name] = owned
        for chain in table.chains:
            if not table.builtin_chain(chain.name):
                continue
            foreign_ahead = False
            for rule in chain.rules:
                if rule.target is not None and rule.target.name in owned:
                    jump = Jump(name, chain.name, rule.target.name)
                    jumps.add(jump)
                    if foreign_ahead:
                        misplaced.add(jump)
                else:
                    foreign_ahead = True
    return KernelState(chains=chains, jumps=frozenset(jumps), misplaced=frozenset(misplaced))


def restore(text: str, binary: str = RESTORE) -> None:
    """Apply iptables-restore text (--noflush: only what it names changes), atomically per
    table; raises IptablesError with iptables' own message."""
    if not text:
        return
    proc = subprocess.run(
        [binary, "--noflush", "--wait"], input=text, text=True, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise IptablesError(f"{binary} failed: {proc.stderr.strip()}")


def _save(table: str, binary: str) -> str:
    proc = subprocess.run([binary, "-t", table], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise IptablesError(f"{binary} -t {table} failed: {proc.stderr.strip()}")
    return proc.stdout


def _saved_comments(
    table: str, chains: tuple[str, ...], binary: str = SAVE
) -> dict[str, list[str]]:
    """Each chain's rules as their comment tokens, from the kernel's own dump."""
    dump = _save(table, binary)
    wanted = set(chains)
    found: dict[str, list[str]] = {}
    for line in dump.splitlines():
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in wanted:
                found[name] = []
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            if chain in wanted:
                match = _COMMENT.search(line)
                found.setdefault(chain, []).append(
                    match.group(1).removeprefix(COMMENT_PREFIX) if match else ""
                )
    return found


# Two ways to read chains back, priced as measured on the benchmark machine: rule by rule
# through python-iptables, on tables it has loaded anyway (~110 us per rule read), or one
# iptables-legacy-save dump of the table, parsed (~3 us per rule in the table, however
# few are read). A small change in a big table reads rule by rule; a first apply dumps.
RULE_BY_RULE_US = 110.0
DUMP_PER_TABLE_RULE_US = 3.0


def verify(ruleset: Ruleset, chains: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Read the rules back from the kernel and check each given steer chain (default: all)
    holds exactly what was rendered, and that every entry jump is in place."""
    tables = {name: _table(name) for name in TABLES}
    checked = chains if chains is not None else ruleset.chains
    for table_name, chain_names in checked.items():
        if not chain_names:
            continue
        reading = sum(len(ruleset.rules_of(table_name, c)) for c in chain_names)
        in_table = sum(len(ruleset.rules_of(table_name, c)) for c in ruleset.chains[table_name])
        if reading * RULE_BY_RULE_US <= in_table * DUMP_PER_TABLE_RULE_US:
            found = _chain_comments(tables[table_name], chain_names)
        else:
            found = _saved_comments(table_name, chain_names)
        for chain_name in chain_names:
            if chain_name not in found:
                raise IptablesError(f"{table_name}/{chain_name} missing after apply")
            got = found[chain_name]
            want = [comment_token(r.comment) for r in ruleset.rules_of(table_name, chain_name)]
            if got != want:
                first = next(
                    (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                    min(len(got), len(want)),
                )
                raise IptablesError(
                    f"{table_name}/{chain_name} read back {len(got)} rules, expected "
                    f"{len(want)}; first difference at rule {first}"
                )
    state = _read_state(tables)
    missing = (set(ruleset.jumps) - state.jumps) | (set(ruleset.jumps) & state.misplaced)
    if missing:
        raise IptablesError(f"entry jumps missing after apply: {sorted(j.target for j in missing)}")


def _chain_comments(table: iptc.Table, chains: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        name: [_comment_of(rule) for rule in iptc.Chain(table, name).rules]
        for name in chains
        if table.is_chain(name)
    }


def read_state6() -> KernelState:
    """steer's ip6tables chains and entry jumps, from ip6tables-legacy-save (steer's IPv6
    rules are a few per pod, all in the filter table)."""
    chains: set[str] = set()
    jumps: set[Jump] = set()
    for line in _save("filter", SAVE6).splitlines():
        if line.startswith(f":{CHAIN_PREFIX}"):
            chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            words = line.split()
            target = words[words.index("-j") + 1] if "-j" in words else ""
            if target.startswith(CHAIN_PREFIX) and not words[1].startswith(CHAIN_PREFIX):
                jumps.add(Jump("filter", words[1], target))
    return KernelState(chains={"filter": frozenset(chains)}, jumps=frozenset(jumps))


def verify6(ruleset: Ruleset, chains: Mapping[str, tuple[str, ...]]) -> None:
    """`verify` for the IPv6 ruleset, read back from ip6tables-legacy-save."""
    for table_name, chain_names in chains.items():
        if not chain_names:
            continue
        found = _saved_comments(table_name, chain_names, SAVE6)
        for chain_name in chain_names:
            want = [comment_token(r.comment) for r in ruleset.rules_of(table_name, chain_name)]
            if found.get(chain_name) != want:
                raise IptablesError(f"ip6tables {table_name}/{chain_name} differs after apply")
    missing = set(ruleset.jumps) - read_state6().jumps
    if missing:
        raise IptablesError(f"ip6tables entry jumps missing: {sorted(j.target for j in missing)}")


def counters(table_name: str, chain_name: str) -> Iterator[RuleCounters]:
    table = _table(table_name)
    if not table.is_chain(chain_name):
        return
    for rule in iptc.Chain(table, chain_name).rules:
        packets, nbytes = rule.get_counters()
        yield RuleCounters(_comment_of(rule), int(packets), int(nbytes))
