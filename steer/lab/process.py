"""Child processes that never outlive their parent or their `with` block."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def supervised(
    argv: list[str], log_path: Path, stop_timeout: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` logging to `log_path`, terminated (then killed) when the block ends.

    setpriv (util-linux) asks the kernel to SIGTERM the child should this process die
    outright (kill -9 runs no `finally`), so nothing is left orphaned; it is done by
    setpriv rather than preexec_fn, which is unsafe with threads. The death signal follows
    the thread that started the child: start from the main thread.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
