"""Ray processes that a test run leaves behind, found by process session and ended (tests/train's guards).

A pytest run owns its own session (an in-process Ray instance's processes stay in it) and the session of
each process it starts in a session of its own (tests/train's `spawned`: a leader's pid is its session's
id). Ray on the same host that the run did not start (another run's, a real node's pods) is in none of
them and is never touched: the module guard once SIGKILLed a lifecycle run's Ray processes in their pods,
from a test run beside it, when it ended every Ray process that was new since the module began.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Collection, Iterable

from processlist import processes

#: What a Ray process's command line contains (the workers' `ray::` titles, the daemons' scripts).
RAY_PROCESS_MARKERS = (
    "ray::",
    "raylet",
    "gcs_server",
    "ray/dashboard",
    "default_worker.py",
    "log_monitor.py",
)


def is_ray(cmdline: str) -> bool:
    return any(m in cmdline for m in RAY_PROCESS_MARKERS)


def in_session(sid: int) -> list[int]:
    """The pids of every process in session `sid`."""
    pids = []
    for pid in processes():
        with contextlib.suppress(OSError):  # gone since the listing
            if os.getsid(pid) == sid:
                pids.append(pid)
    return pids


def ray_processes(sessions: Collection[int]) -> dict[int, str]:
    """pid -> command line of the Ray processes in `sessions`."""
    found = {}
    for pid, cmd in processes().items():
        if is_ray(cmd):
            with contextlib.suppress(OSError):  # gone since the listing
                if os.getsid(pid) in sessions:
                    found[pid] = cmd
    return found


class RunSessions:
    """The process sessions a pytest run owns: its own, and the session of each leader it adopts."""

    def __init__(self) -> None:
        self.ids: set[int] = {os.getsid(0)}

    def adopt(self, leaders: Iterable[subprocess.Popen[str]]) -> None:
        """Own the sessions of processes started with `start_new_session=True`."""
        self.ids.update(p.pid for p in leaders)  # a leader's pid is its session's id

    def ray_processes(self) -> dict[int, str]:
        """pid -> command line of the Ray processes in this run's sessions."""
        return ray_processes(self.ids)

    def end_ray_processes(
        self, *, spare: Collection[int] = (), grace: float, poll: float = 0.5
    ) -> dict[int, str]:
        """Give this run's Ray processes (but the pids in `spare`) `grace` seconds to exit, SIGKILL those
        still there, and return them (pid -> command line): a caller that expected none can fail."""
        deadline = time.monotonic() + grace
        while (left := {p: c for p, c in self.ray_processes().items() if p not in spare}) and (
            time.monotonic() < deadline
        ):
            time.sleep(poll)  # Ray's processes exit a moment after their driver; no event tells when
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left


def end_session(leader: subprocess.Popen[str]) -> None:
    """SIGKILL every process in the session `leader` started (a finished driver's Ray workers too, not
    only a leader still running), and reap the leader."""
    for pid in in_session(leader.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if leader.poll() is None:
        leader.wait()
