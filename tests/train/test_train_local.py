"""`tandem train --local` beside another Ray cluster: it starts its own instance, ignores the one that
`RAY_ADDRESS` names, and leaves that cluster's processes running (real `ray start`, real processes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_session(sid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temp folder: Ray's socket paths under it must fit the 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_local_run_ignores_another_ray_cluster_and_leaves_it_running(
    tmp_path: Path,
    short_dir: Path,
    spawned: list[subprocess.Popen[str]],
    write_job: Callable[..., Path],
    tandem_cmd: Callable[..., list[str]],
    wait_for: Callable[..., Any],
) -> None:
    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    other = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         f"--temp-dir={short_dir}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    spawned.append(other)  # its session: every process of that cluster, killed by PID at the end
    out, _ = other.communicate(timeout=180)
    assert other.returncode == 0, out[-2000:]
    theirs = wait_for(lambda: in_session(other.pid), 30, "the other cluster's processes")
    job = write_job(tmp_path / "beside.yaml", steps=4, every=2)
    env = os.environ | {"RAY_ADDRESS": f"127.0.0.1:{port}"}  # a user's shell pointing at that cluster
    run = subprocess.Popen(
        tandem_cmd("train", str(job), "--local", "--checkpoint-dir", str(tmp_path / "ck"), "--seq-len", "32",
                   "--no-progress"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
    )  # fmt: skip
    spawned.append(run)
    log, _ = run.communicate(timeout=300)
    # It trained on a Ray of its own (joining that cluster failed: num_cpus may not be given there).
    assert run.returncode == 0, log[-3000:]
    assert "completed at step 4" in log
    # Its own Ray instance ended with it ...
    wait_for(lambda: not in_session(run.pid), 60, "the local run's Ray processes to end")
    # ... and none of the other cluster's processes did.
    assert theirs <= in_session(other.pid), "the local run ended processes of a Ray cluster it did not start"
