"""Shared pieces of the Ray + PyTorch integration tests (real processes, CPU, the tiny model)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from rayguard import RunSessions, end_session

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


#: The process sessions this pytest run owns (`rayguard`): its own and each `spawned` process's. The
#: module guard looks only at these, so Ray on the same host that this run did not start is left alone.
_RUN = RunSessions()


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts in their own session; at the end every process left in those sessions
    (a finished driver's Ray workers too, not only a leader still running) is killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    _RUN.adopt(procs)
    for p in procs:
        end_session(p)


@pytest.fixture(scope="module", autouse=True)
def no_ray_process_outlives_its_module() -> Iterator[None]:
    """Every Ray process a test module started ends with it (Tandem's own clean-up, not this fixture's:
    a leftover fails the module after being killed, so a leak cannot hide). Only this run's sessions are
    looked at (`_RUN`): test_module_guard.py shows that Ray this run did not start survives it."""
    before = set(_RUN.ray_processes())
    yield
    left = _RUN.end_ray_processes(spare=before, grace=60)
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
    RunSessions().end_ray_processes(grace=timeout)  # a new one owns only this pytest's session
