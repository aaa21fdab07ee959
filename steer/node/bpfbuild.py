"""`python -m steer.node.bpfbuild --source DIR --pins DIR`: compile, verify and pin the
BPF programs and maps, then exit.

The agent runs this as a child so that bcc and LLVM (about 140 MiB once a compile has
run) never stay in its own memory. Success is exit status 0 with everything pinned; a
failure prints one error, prefixed so the agent can find it among LLVM's warnings, and
exits 1 having pinned nothing the agent would adopt (the agent removes the directory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.node.bpf import BUILD_ERROR, BpfError, compile_and_pin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steer.node.bpfbuild")
    parser.add_argument("--source", type=Path, required=True, help="the bpf/ directory")
    parser.add_argument("--pins", type=Path, required=True, help="where to pin")
    args = parser.parse_args(argv)
    try:
        compile_and_pin(args.source, args.pins)
    except BpfError as exc:
        print(f"{BUILD_ERROR}{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
