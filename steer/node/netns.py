"""Helpers for doing work inside a named network namespace.

A network namespace belongs to a thread, not to a process, and a socket keeps the
namespace it was created in for its whole life. So the cheap way to talk to a pod is
a short-lived thread that joins the pod's namespace, creates the socket and exits:
no fork, no ``ip netns exec``, and the caller's own threads never move.

These helpers only ever join namespaces that already exist under ``/run/netns``;
creating them is the lab's job.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# Where iproute2 (and pyroute2) bind-mount named network namespaces.
NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> Path:
    """Return the bind-mount path of a named namespace, refusing names that could escape
    the run directory."""
    if not netns or "/" in netns or netns in {".", ".."}:
        raise ValueError(f"invalid network namespace name {netns!r}")
    return NETNS_RUN_DIR / netns


def _setns_current_thread(netns: str) -> None:
    # Opening the mount (instead of passing O_CREAT semantics through pyroute2) makes a
    # missing namespace a FileNotFoundError rather than a silently created empty one.
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns!r}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has joined ``netns``; return its result or
    re-raise its exception in the caller.

    Anything ``fn`` creates that is bound to a namespace at creation time (sockets,
    netlink handles) stays in ``netns`` after the thread is gone. Anything that
    resolves the namespace on use (``/proc/sys/net`` paths) must be done inside ``fn``.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _setns_current_thread(netns)
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread, not swallowed
            failure.append(exc)

    # The thread is thrown away afterwards, so its namespace never needs restoring.
    thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def enter_netns(netns: str) -> None:
    """Move the calling process's main thread into ``netns``.

    Threads created afterwards inherit the namespace; threads that already exist do
    not. That split would make some of a process's sockets land in the wrong
    namespace depending on which thread opened them, so this refuses to run anywhere
    but in a single-threaded process's main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("enter_netns must be called from the main thread")
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        raise RuntimeError(f"enter_netns must run before any thread is started (running: {names})")
    _setns_current_thread(netns)


def netns_exec_argv(netns: str, argv: list[str]) -> list[str]:
    """Prefix ``argv`` so that it runs inside ``netns`` (for subprocesses we do not own)."""
    netns_path(netns)  # validate early: a bad name would otherwise surface as an ip(8) error
    return ["ip", "netns", "exec", netns, *argv]
