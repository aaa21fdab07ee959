"""runc for scripts/kube-node.sh: drops from a container's requested capabilities those
this machine's root does not hold, then runs the real runc.

Root here lacks CAP_SYS_RESOURCE (its bounding set), and runc fails to start any container
that asks for a capability outside its own bounding set ("unable to apply caps: operation
not permitted"). steer's agent asks for SYS_RESOURCE (for RLIMIT_MEMLOCK on kernels before
5.11, which this one is not). A real node's root holds every capability; this shim keeps the
manifests as users apply them. Each capability dropped is logged to stderr (containerd's log).

Usage: runc-caps.py REAL_RUNC RUNC_ARGS...
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

# Bit numbers of linux/capability.h, up to CAP_CHECKPOINT_RESTORE (40).
NAMES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]


def missing_caps() -> set[str]:
    status = Path("/proc/self/status").read_text()
    bounding = int(status.split("CapBnd:")[1].split()[0], 16)
    return {f"CAP_{name}" for bit, name in enumerate(NAMES) if not bounding >> bit & 1}


def strip(path: Path, process_only: bool, missing: set[str]) -> None:
    spec = json.loads(path.read_text())
    process = spec if process_only else spec.get("process", {})
    caps = process.get("capabilities") or {}
    dropped = set()
    for kind, names in caps.items():
        if isinstance(names, list):
            dropped |= missing & set(names)
            caps[kind] = [n for n in names if n not in missing]
    if dropped:
        print(f"runc-caps: {path}: dropped {sorted(dropped)}", file=sys.stderr)
        path.write_text(json.dumps(spec))


def main() -> None:
    real, args = sys.argv[1], sys.argv[2:]
    missing = missing_caps()
    if missing:
        for flag, value in itertools.pairwise(args):
            if flag in ("--bundle", "-b"):
                strip(Path(value) / "config.json", False, missing)
            elif flag in ("--process", "-p"):
                strip(Path(value), True, missing)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main()
