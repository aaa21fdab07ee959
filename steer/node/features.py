"""What this node's kernel can do, and which datapath each pod gets.

The probe checks the cheap things first (cgroup v2, bcc, a kernel denylisted for sk_msg);
whether each program type and helper really loads is proven by loading the real programs
(steer.node.bpfobjects), whose failure is recorded here as the reason to fall back. A result can
be forced with STEER_FEATURES, e.g. '{"ebpf": false}', to test the fallback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
from dataclasses import dataclass, replace
from pathlib import Path

from steer.constants import CGROUP2_CANDIDATES
from steer.model.pod import Dataplane
from steer.node import libbpf

FORCE_ENV = "STEER_FEATURES"


@dataclass(frozen=True)
class KernelRange:
    first: tuple[int, ...]
    last_excluded: tuple[int, ...]
    why: str

    def contains(self, version: tuple[int, ...]) -> bool:
        return self.first <= version < self.last_excluded


# Kernels whose sockmap redirect is known to misbehave; sk_msg is turned off there and
# steering otherwise stays on eBPF. (Calico's sidecar acceleration requires 4.20 for the
# same reason.)
SKMSG_DENYLIST = (KernelRange((0,), (4, 20), "sockmap redirect bugs before Linux 4.20"),)


@dataclass(frozen=True)
class Features:
    ebpf: bool
    skmsg: bool
    ebpf_reason: str
    skmsg_reason: str

    def without_ebpf(self, reason: str) -> Features:
        return replace(self, ebpf=False, skmsg=False, ebpf_reason=reason, skmsg_reason=reason)


def kernel_version(release: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not match:
        return (0,)
    return tuple(int(part) for part in match.groups() if part is not None)


def _cgroup2() -> Path | None:
    mounts = Path("/proc/mounts").read_text().split("\n")
    cgroup2_mounts = {line.split()[1] for line in mounts if line.split()[2:3] == ["cgroup2"]}
    return next((p for p in CGROUP2_CANDIDATES if str(p) in cgroup2_mounts), None)


def probe(release: str | None = None) -> Features:
    """The node's features before loading; see `with_load_result` for the load itself."""
    release = release or platform.release()
    forced = json.loads(os.environ.get(FORCE_ENV, "{}") or "{}")
    if forced.get("ebpf") is False:
        reason = f"disabled by {FORCE_ENV}"
        return Features(False, False, reason, reason)
    if _cgroup2() is None:
        reason = "no cgroup v2 mount: cgroup BPF hooks need the unified hierarchy"
        return Features(False, False, reason, reason)
    # Found, not imported: bcc brings LLVM along, and only the build child needs it.
    if importlib.util.find_spec("bcc") is None:
        reason = "bcc is not installed; fix: apt-get install python3-bpfcc"
        return Features(False, False, reason, reason)
    try:
        libbpf.possible_cpus()
    except OSError as exc:
        reason = f"libbpf is not loadable ({exc}); fix: apt-get install libbpf1"
        return Features(False, False, reason, reason)
    version = kernel_version(release)
    denied = next((r for r in SKMSG_DENYLIST if r.contains(version)), None)
    skmsg = denied is None and forced.get("skmsg") is not False
    if denied is not None:
        skmsg_reason = f"kernel {release}: {denied.why}"
    elif not skmsg:
        skmsg_reason = f"disabled by {FORCE_ENV}"
    else:
        skmsg_reason = f"kernel {release} supports sockmap redirect"
    return Features(True, skmsg, f"kernel {release} has the cgroup BPF hooks", skmsg_reason)


def choose(dataplane: Dataplane, features: Features, has_cgroup: bool) -> tuple[Dataplane, str]:
    """The datapath a pod gets, and why, as `steer status` shows it."""
    if dataplane is Dataplane.IPTABLES:
        return Dataplane.IPTABLES, "annotation steer.dev/dataplane=iptables"
    asked = "annotation asks for ebpf" if dataplane is Dataplane.EBPF else "auto"
    if not features.ebpf:
        return Dataplane.IPTABLES, f"{asked}, but eBPF is unavailable: {features.ebpf_reason}"
    if not has_cgroup:
        return Dataplane.IPTABLES, f"{asked}, but the pod's cgroup is not known"
    return Dataplane.EBPF, f"{asked}: {features.ebpf_reason}"
