"""Child processes that never outlive their parent or their `with` block, unless asked to
(`steer demo --keep`)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steer.node.netns import netns_path


@contextmanager
def supervised(
    argv: list[str],
    log_path: Path,
    stop_timeout: float = 10.0,
    *,
    netns: str = "",
    outlive_parent: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` logging to `log_path`, terminated (then killed) when the block ends.

    setpriv (util-linux) asks the kernel to SIGTERM the child should this process die
    outright (kill -9 runs no `finally`), so nothing is left orphaned; it is done by
    setpriv rather than preexec_fn, which is unsafe with threads. The death signal follows
    the thread that started the child: start from the main thread.

    `netns`: run the child in that named network namespace (nsenter, before it starts).
    `outlive_parent`: no death signal and a session of its own (no terminal's signals),
    so the child survives this process; it still ends with the block unless the caller
    lets go of it (ExitStack.pop_all, after which the block never ends: the generator is
    closed when collected). The caller must then put it where something else stops it:
    for the lab, its node namespace, which `steer lab down` empties.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if netns:
        argv = ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
    if not outlive_parent:
        argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=outlive_parent,
        )
        let_go = False
        try:
            yield proc
        except GeneratorExit:
            # Not the block's end: the caller dropped it unfinished, and this generator is
            # being collected (at exit, for `steer demo --keep`).
            let_go = outlive_parent
            raise
        finally:
            if not let_go and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
