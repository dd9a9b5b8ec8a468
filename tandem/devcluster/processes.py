"""Detached component processes: start in their own session, find them again by pid file, stop them.

Each component runs in a new session (its own process group), so it outlives the `tandem` command
that started it, and `stop` can signal the whole group. A pid file records the pid with the binary
path; a pid is trusted only while `/proc/<pid>/cmdline` still names that binary, so a reused pid
never gets a signal from us.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

STOP_GRACE_SECONDS = 10.0
KILL_WAIT_SECONDS = 5.0
PORT_RANGE_FLOOR = 20000


@dataclass(frozen=True)
class ProcessRecord:
    """What we need to find a started component again: its pid, argv and log file."""

    name: str
    pid: int
    argv: list[str]
    log: str

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ProcessRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(name=data["name"], pid=int(data["pid"]), argv=list(data["argv"]), log=data["log"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessRecord:
    """Start `argv` detached (new session, stdin closed), appending its output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            close_fds=True,
        )
    # The Popen object is dropped on purpose: the process belongs to the cluster, not to us.
    # If we are still alive when it exits, `_reap` collects it so it leaves no zombie.
    return ProcessRecord(name=name, pid=proc.pid, argv=list(argv), log=str(log))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(record: ProcessRecord) -> bool:
    """True while the recorded pid is alive (not a zombie) and still runs the recorded binary."""
    _reap(record.pid)
    proc = Path(f"/proc/{record.pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes()
        stat = (proc / "stat").read_text()
        comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
        state = rest.split()[0]
    except (OSError, IndexError, ValueError):
        return False
    if state == "Z":
        # A zombie leader whose other threads still run is exiting, not gone: those threads still hold
        # its listening sockets (a restart right now would find the ports taken).
        with contextlib.suppress(OSError):
            if any(task.name != str(record.pid) for task in (proc / "task").iterdir()):
                return True
        _reap(record.pid)  # it may have exited after the first reap above
        return False
    if not cmdline:
        # Mid-exec (Popen has returned, the kernel is still loading a large binary), argv is not
        # readable yet, but the command name already is (truncated to 15 bytes by the kernel).
        return comm == Path(record.argv[0]).name[:15]
    return cmdline.split(b"\0")[0].decode(errors="replace") == record.argv[0]


def _signal_group(record: ProcessRecord, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, sig)


def _exited(record: ProcessRecord) -> bool:
    """Whether the process is gone; our own children count as gone only once reaped (no zombie)."""
    try:
        pid, _status = os.waitpid(record.pid, os.WNOHANG)
    except ChildProcessError:  # started by another `tandem` process: /proc is all we can see
        return not is_running(record)
    return pid == record.pid


def _wait_gone(records: Iterable[ProcessRecord], seconds: float) -> list[ProcessRecord]:
    """Poll until every record is gone or `seconds` pass; return those still running."""
    deadline = time.monotonic() + seconds
    remaining = [r for r in records if not _exited(r)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [r for r in remaining if not _exited(r)]
    return remaining


def stop(records: Sequence[ProcessRecord], grace: float = STOP_GRACE_SECONDS) -> list[ProcessRecord]:
    """SIGTERM each live record's process group, SIGKILL what is left after `grace` seconds.

    Returns the records that survived even SIGKILL (normally none).
    """
    live = [r for r in records if is_running(r)]
    for record in live:
        _signal_group(record, signal.SIGTERM)
    stubborn = _wait_gone(live, grace)
    for record in stubborn:
        _signal_group(record, signal.SIGKILL)
    return _wait_gone(stubborn, KILL_WAIT_SECONDS)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `host:port` now (SO_REUSEADDR, as Go's listeners use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """`count` distinct free loopback ports below the ephemeral range.

    Ports from the ephemeral range could later be taken by some outgoing connection's local end
    and block a restart; ports below it are only ever taken by listeners.
    """
    ceiling = max(_ephemeral_floor(), PORT_RANGE_FLOOR + 1000)
    taken = set(avoid)
    chosen: list[int] = []
    candidates = list(range(PORT_RANGE_FLOOR, ceiling))
    random.shuffle(candidates)
    for port in candidates:
        if port not in taken and port_is_free(port):
            chosen.append(port)
            taken.add(port)
            if len(chosen) == count:
                return chosen
    raise OSError(f"no {count} free loopback ports between {PORT_RANGE_FLOOR} and {ceiling}")


def log_tail(path: Path | str, lines: int = 15) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(log file missing)"
