"""The benchmarks' CPU accounting of processes outside the lab's cgroup (steer's agent and
control plane), read from /proc the way `steer bench datapath` and `churn` read them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from steer.bench.memory import processes_cpu_usec

# Spends 0.3 s of CPU in a second thread, says so, then waits to be killed. Its name holds
# a space and a ")", which /proc/PID/stat prints as is: the fields after it must still be
# found.
_SPIN_IN_A_THREAD = """
import threading, time
with open("/proc/self/comm", "w") as comm:
    comm.write("odd) name x")
def spin():
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass
worker = threading.Thread(target=spin)
worker.start()
worker.join()
print("spun", flush=True)
time.sleep(60)
"""


def test_the_cpu_of_every_thread_of_a_process_is_counted() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _SPIN_IN_A_THREAD], stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"spun\n"
            assert Path(f"/proc/{child.pid}/comm").read_text() == "odd) name x\n"
            user, system = processes_cpu_usec([child.pid])
            assert user + system >= 250_000
            assert processes_cpu_usec([child.pid, child.pid]) == (2 * user, 2 * system)
        finally:
            child.kill()
