"""Child processes on this machine: trials, model servers, emulators.

Loopback only: every port is taken on 127.0.0.1 and every readiness probe goes there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from typing import Callable


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for children that must die with SIGKILL when this process dies (Linux), so
    a killed executor or notebook kernel leaves no orphans behind."""
    parent = os.getpid()

    def in_child() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            return
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal will come
            os._exit(1)

    return in_child


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:`port` (or `process` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process exited with code {process.returncode} before listening on port {port}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
