"""`make demo-down` finds and stops every operator bound to the demo cluster, started by hand too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem import demo

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
users: [{name: u, user: {token: t}}]
"""


@pytest.fixture
def hand_started_operator(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A real operator started the way the docs say, with a kubeconfig from the cluster's state folder
    (its API server is gone, so it retries for ever: what the demo's teardown used to leave behind)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin.kubeconfig").write_text(KUBECONFIG)
    env = {**os.environ, "KUBECONFIG": str(state / "admin.kubeconfig"), "TANDEM_METRICS_PORT": "0"}
    env["TANDEM_HEALTH_PORT"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.operator"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield state, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_an_operator_restarted_by_hand_is_found_and_stopped(
    hand_started_operator: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    state, proc = hand_started_operator
    deadline = time.monotonic() + 30
    while not (found := demo.operators_of(state)) and time.monotonic() < deadline:
        time.sleep(0.1)  # until the interpreter has exec'd and its argv is readable
    assert [r.pid for r in found] == [proc.pid]
    other = tmp_path / "other"
    other.mkdir()
    assert demo.operators_of(other) == []  # an operator of another cluster is left alone
    assert demo._stop(found) == []
    assert proc.wait(timeout=10) is not None
