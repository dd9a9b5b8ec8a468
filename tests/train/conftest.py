"""Shared pieces of the Ray + PyTorch integration tests (real processes, CPU, the tiny model)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from processlist import processes

REPO = Path(__file__).resolve().parents[2]


def _wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _write_job(
    path: Path, *, steps: int, every: int, workers: int = 2, keep: int = 10, **builtin: Any
) -> Path:
    job = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": path.stem},
        "spec": {
            "trainer": {
                "builtin": {
                    "size": "tiny",
                    "dataset": {"uri": "tandem://corpus-small"},
                    "maxSteps": steps,
                    "learningRate": 0.003,
                    **builtin,
                }
            },
            "workers": {"replicas": workers, "resources": {"cpu": "1"}},
            "precision": "fp32",
            "batch": {"perDevice": 4, "global": 8 * workers},
            "checkpoint": {"storage": {"pvc": "unused-locally"}, "everySteps": every, "keep": keep},
        },
    }
    path.write_text(yaml.safe_dump(job))
    return path


def _tandem_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem", *args]


# The helpers are fixtures (not imports) because every test folder has its own conftest module.


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """`wait_for(condition, timeout, what)`: poll until truthy, fail after `timeout` seconds."""
    return _wait_for


@pytest.fixture
def write_job() -> Callable[..., Path]:
    """`write_job(path, steps=, every=, workers=2, **builtin)`: a tiny-GPT TrainingJob YAML file."""
    return _write_job


@pytest.fixture
def tandem_cmd() -> Callable[..., list[str]]:
    """`tandem_cmd(*args)`: the argv that runs `tandem ARGS` with this interpreter."""
    return _tandem_cmd


def _in_session(sid: int) -> list[int]:
    pids = []
    for pid in processes():
        try:
            if os.getsid(pid) == sid:
                pids.append(pid)
        except OSError:
            continue
    return pids


RAY_PROCESS_MARKERS = (
    "ray::",
    "raylet",
    "gcs_server",
    "ray/dashboard",
    "default_worker.py",
    "log_monitor.py",
)


def _ray_processes() -> dict[int, str]:
    return {pid: cmd for pid, cmd in processes().items() if any(m in cmd for m in RAY_PROCESS_MARKERS)}


#: The process sessions this pytest run owns: its own (an in-process Ray instance's processes stay in
#: it) and each `spawned` process's (its Ray runs there). Ray on the same host that this run did not
#: start (another run's, a real node's pods) is in none of them, and the module guard leaves it alone:
#: it once killed a lifecycle run's Ray processes in their pods, from a test run beside it.
_OWN_SESSIONS: set[int] = {os.getsid(0)}


def _own_ray_processes() -> dict[int, str]:
    own = {}
    for pid, cmd in _ray_processes().items():
        with contextlib.suppress(OSError):
            if os.getsid(pid) in _OWN_SESSIONS:
                own[pid] = cmd
    return own


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts in their own session; at the end every process left in those sessions
    (a finished driver's Ray workers too, not only a leader still running) is killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    _OWN_SESSIONS.update(p.pid for p in procs)  # a leader's pid is its session's id
    for p in procs:
        for pid in _in_session(p.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.wait()


@pytest.fixture(scope="module", autouse=True)
def no_ray_process_outlives_its_module() -> Iterator[None]:
    """Every Ray process a test module started ends with it (Tandem's own clean-up, not this fixture's:
    a leftover fails the module after being killed, so a leak cannot hide). Only this run's sessions are
    looked at (`_OWN_SESSIONS`)."""
    before = set(_own_ray_processes())
    yield
    deadline = time.monotonic() + 60
    while (
        left := {p: c for p, c in _own_ray_processes().items() if p not in before}
    ) and time.monotonic() < deadline:
        time.sleep(0.5)  # Ray's processes exit a moment after their driver; there is no event to wait on
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes left running after the module: {sorted(left.values())[:5]}"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance per test module (4 logical CPUs on this 2-core machine), run as Tandem runs
    Ray for training (`ray_runner.RAY_ENV`)."""
    import ray

    from tandem.workloads.train.ray_runner import ray_env

    with ray_env():
        ray.init(num_cpus=4, configure_logging=False, log_to_driver=False)
        yield
        ray.shutdown()
    _end_own_ray_processes()


def _end_own_ray_processes(timeout: float = 60.0) -> None:
    """The in-process Ray instance's processes (in this pytest's session; spawned runs have sessions of
    their own, which `no_ray_process_outlives_its_module` still checks) exit a moment after
    `ray.shutdown()`, or, seen once on the loaded machine, a minute later: this fixture started them, so
    it ends them."""
    own = os.getsid(0)

    def left() -> list[int]:
        found = []
        for pid in _ray_processes():
            with contextlib.suppress(OSError):
                if os.getsid(pid) == own:
                    found.append(pid)
        return found

    deadline = time.monotonic() + timeout
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)  # no event tells when Ray's workers have noticed their raylet is gone
    for pid in left():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
