"""Policies held back because Envoy refused what they rendered to.

steer validates with Envoy's own engines and limits, so a NACK means a gap in that
validation. Without a quarantine it would stop every later change from reaching the node:
Envoy keeps running its last good routes and refuses each new version as a whole, since
the bad resource is still in it. Instead, the policies that changed since the node last
accepted a snapshot are held back (they are the only ones that can have brought the bad
resource in), everything else is pushed again without them, and each held policy reports
Envoy's message until its author changes it; a changed policy is tried again.

When several policies changed at once (the first snapshot after a start, a bulk apply),
all of them are held, then tried again one at a time after each accepted snapshot: an
innocent one goes back in force, and the one refused again alone is the culprit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from steer.model.policy import HTTPPolicy


@dataclass(frozen=True)
class Held:
    policy: HTTPPolicy  # as it was when Envoy refused it
    reason: str  # Envoy's message
    # Refused on its own (the culprit), or only among other changed policies (a suspect,
    # to be tried again alone).
    confirmed: bool


@dataclass
class Quarantine:
    held: dict[str, Held] = field(default_factory=dict)
    # The policies of the last snapshot the node accepted whole, by key.
    _accepted: dict[str, HTTPPolicy] = field(default_factory=dict)

    def admit(self, policies: Iterable[HTTPPolicy]) -> list[HTTPPolicy]:
        """The policies to render: all but the held ones. A held policy that was edited or
        deleted since it was refused is released (an edit is a new attempt)."""
        policies = list(policies)
        present = {p.key: p for p in policies}
        for key in [k for k, h in self.held.items() if present.get(k) != h.policy]:
            del self.held[key]
        return [p for p in policies if p.key not in self.held]

    def accepted(self, pushed: Sequence[HTTPPolicy]) -> bool:
        """The node accepted the snapshot rendered from `pushed`. True if a suspect was
        released to be tried alone: render and push again."""
        self._accepted = {p.key: p for p in pushed}
        suspect = next((k for k, h in sorted(self.held.items()) if not h.confirmed), None)
        if suspect is None:
            return False
        del self.held[suspect]
        return True

    def refused(self, pushed: Sequence[HTTPPolicy], reason: str) -> list[str]:
        """The node refused the snapshot rendered from `pushed`: hold back what changed
        since the last accepted one. Returns the keys newly held (none: nothing to
        blame, as when a snapshot with no policy change is refused)."""
        suspects = [p for p in pushed if self._accepted.get(p.key) != p]
        for policy in suspects:
            self.held[policy.key] = Held(policy, reason, confirmed=len(suspects) == 1)
        return [p.key for p in suspects]

    def report(self) -> list[dict[str, str]]:
        """The culprits, for status: suspects are only held until they are tried alone."""
        return [
            {"policy": k, "reason": h.reason} for k, h in sorted(self.held.items()) if h.confirmed
        ]
