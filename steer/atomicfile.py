"""Whole-file writes: a reader (steer status, the demo, the agent's input watch, a
restarted agent) sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str, *, durable: bool = False) -> None:
    """Write beside the target, then rename over it. The staged name is hidden, unique per
    process and ends in .tmp, so watchers of a directory of *.yaml never pick it up.
    `durable` also survives a power cut (fsync before the rename); /run needs none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with staged.open("w") as out:
            out.write(text)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)


def write_json_atomic(
    path: Path, document: object, *, compact: bool = False, sort_keys: bool = False
) -> None:
    """`compact` for big documents written often: indenting forces json's pure-Python
    encoder, which took 40 ms for the agent's status at 1k pods."""
    text = (
        json.dumps(document, separators=(",", ":"), sort_keys=sort_keys)
        if compact
        else json.dumps(document, indent=2, sort_keys=sort_keys) + "\n"
    )
    write_text_atomic(path, text, durable=not compact)
