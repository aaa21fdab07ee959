"""Compile, verify and pin the BPF programs and maps: `python -m steer.node.bpfbuild
--source DIR --pins DIR`, then exit.

The agent runs this as a child so that bcc and LLVM (about 140 MiB once a compile has
run) never stay in its own memory. Success is exit status 0 with everything pinned; a
failure prints one error, prefixed so the agent can find it among LLVM's warnings, and
exits 1 having pinned nothing the agent would adopt (the agent removes the directory).
"""

from __future__ import annotations

import argparse
import ctypes as ct
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steer.node import libbpf
from steer.node.bpfmaps import BUILD_OPTIONS, MAPS, PROGRAMS, cflags, size_mismatches
from steer.node.libbpf import AttachType

BPF_SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"
# Textual order matters: bcc rewrites map calls only in its main text, so headers are
# inlined ahead of the hooks rather than #included (their include guards then skip the
# #include lines in the hook files).
SOURCE_FILES = (
    "include/steer/config.h",
    "include/steer/maps.h",
    "include/steer/common.h",
    "include/steer/service.h",
    "connect4.c",
    "sockops.c",
    "skmsg.c",
    "getsockopt.c",
)
BUILD_ERROR = "steer-bpf-build: "
COMPILE_TIMEOUT_S = 300


class BpfError(RuntimeError):
    pass


def source_text(source_dir: Path | None = None) -> str:
    directory = source_dir or BPF_SOURCE_DIR
    return "\n".join((directory / name).read_text() for name in SOURCE_FILES)


def build_hash() -> str:
    """Identifies what a compile produces: the sources and the options they are built
    with. Pins from another build are never adopted."""
    digest = hashlib.sha256(source_text().encode())
    digest.update(json.dumps(BUILD_OPTIONS, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build_command(pin_dir: Path) -> list[str]:
    """The child that compiles the current sources and pins the result in `pin_dir`."""
    source = str(BPF_SOURCE_DIR)
    return [sys.executable, "-m", "steer.node.bpfbuild", "--source", source, "--pins", str(pin_dir)]


def errno_message(what: str) -> str:
    return f"{what}: {os.strerror(ct.get_errno())}"


def attach_program(prog_fd: int, target_fd: int, attach_type: str, flags: int) -> None:
    if libbpf.prog_attach(prog_fd, target_fd, AttachType[attach_type], flags) != 0:
        raise BpfError(errno_message(f"attaching as {attach_type}"))


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _bcc() -> Any:
    import bcc  # imported late, in the compiling child only: bcc brings LLVM along

    return bcc


def _pin(fd: int, path: Path) -> None:
    if libbpf.obj_pin(fd, path) != 0:
        raise BpfError(errno_message(f"pinning {path}"))


def _check_layouts(module: Any) -> None:
    problems = []
    for name, layout in MAPS.items():
        if layout.key is None:
            continue
        table = module[name.encode()]
        # Per-CPU tables expose the per-CPU array as Leaf and one CPU's value as sLeaf.
        value = getattr(table, "sLeaf", table.Leaf)
        problems += size_mismatches(
            name, ct.sizeof(table.Key), ct.sizeof(value), int(table.max_entries)
        )
    if problems:
        raise BpfError(f"the C maps differ from steer/node/bpfmaps.py: {'; '.join(problems)}")


def compile_and_pin(source_dir: Path, pin_dir: Path) -> None:
    """Compile bpf/ with bcc, load every program through the verifier, pin programs and
    maps under `pin_dir`. Runs in the child that the agent starts: the process ends right
    after, and LLVM's memory with it."""
    bcc = _bcc()
    try:
        # bcc wants bytes for text and names (str only earns a DeprecationWarning).
        module = bcc.BPF(
            text=source_text(source_dir).encode(),
            cflags=[f"-I{source_dir / 'include'}", *cflags()],
        )
    except Exception as exc:
        raise BpfError(f"compiling bpf/: {exc}") from exc
    _check_layouts(module)
    pin_dir.mkdir(parents=True, exist_ok=True)
    prog_fds: dict[str, int] = {}
    for program in PROGRAMS:
        kwargs = {}
        if program.prog_type in ("CGROUP_SOCK_ADDR", "CGROUP_SOCKOPT"):
            kwargs["attach_type"] = getattr(bcc.BPFAttachType, program.attach_type)
        with _stderr_captured() as verifier_log:
            try:
                fn = module.load_func(
                    program.name.encode(), getattr(bcc.BPFProgType, program.prog_type), **kwargs
                )
            except Exception as exc:
                raise BpfError(
                    f"the verifier rejected {program.name}: {exc}\n"
                    f"verifier log (tail):\n{tail(verifier_log())}"
                ) from exc
        _pin(fn.fd, pin_dir / program.name)
        prog_fds[program.name] = fn.fd
    map_fds = {
        name: module[name.encode()].map_fd if name != "steer_sockhash" else _sockhash_fd(module)
        for name in MAPS
    }
    for name, fd in map_fds.items():
        _pin(fd, pin_dir / name)
    # sk_msg runs on the sockhash: attaching it to the map is a one-time step.
    attach_program(prog_fds["steer_skmsg"], map_fds["steer_sockhash"], "SK_MSG_VERDICT", 0)
    module.cleanup()


def _sockhash_fd(module: Any) -> int:
    # bcc 0.26 has no Table class for SOCKHASH; ask libbcc for the map's fd by name.
    bcc = _bcc()
    fd: int = bcc.lib.bpf_table_fd(module.module, b"steer_sockhash")
    if fd < 0:
        raise BpfError("steer_sockhash has no fd")
    return fd


@contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """libbcc prints the verifier log to fd 2; keep it to put in the error."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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
