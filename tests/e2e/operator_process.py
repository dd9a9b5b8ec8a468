"""Run the real operator as a separate process, the way a user runs `python -m tandem.operator`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
#: A standby operator takes over within the lease duration plus two retry periods of the leader's last
#: renewal (the chart's defaults: 15 + 2 x 2 s; tandem.operator.leader says why).
TAKEOVER_SECONDS = 19.0


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as error:  # the condition may raise while the system converges
            last_error = error
        else:
            if result:
                return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OperatorProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    health_port: int
    kubeconfig: Path
    extra_env: dict[str, str]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def sample(self, metric: str, **labels: str) -> float | None:
        """The value of the first `metric` sample whose labels include `labels`, or None."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"operator exited with {self.process.returncode}:\n{self.log_text()[-3000:]}"
            )
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def health(self) -> dict[str, Any]:
        """Tandem's part of /healthz (the `tandem` probe): leadership, caches, queues."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(json.loads(response.read())["tandem"])

    def kill(self) -> None:
        """SIGKILL: no chance to finish what it was doing (an OOM kill or a node loss)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def restart(self) -> None:
        """Start again with the same identity and log (appending), after stop() or kill()."""
        fresh = start_operator(self.kubeconfig, self.log_path, self.extra_env)
        self.process, self.metrics_port, self.health_port = (
            fresh.process,
            fresh.metrics_port,
            fresh.health_port,
        )

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)


def start_operator(
    kubeconfig: Path, log_path: Path, extra_env: dict[str, str] | None = None
) -> OperatorProcess:
    """Start `python -m tandem.operator` with its own kubeconfig; return once /healthz answers.

    Each process gets a name (POD_NAME, its leader Lease identity, as a pod's name is in the chart),
    kept by `restart`: a restarted operator is the same replica and leads again at once, while a
    second one started beside it is a standby."""
    extra_env = {"POD_NAME": f"operator-{uuid.uuid4().hex[:8]}", **(extra_env or {})}
    metrics_port, health_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "TANDEM_METRICS_PORT": str(metrics_port),
            "TANDEM_HEALTH_PORT": str(health_port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tandem.operator"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    operator = OperatorProcess(
        process, log_path, metrics_port, health_port, kubeconfig, dict(extra_env or {})
    )
    try:
        wait_for(operator.healthy, timeout=60, what="the operator's /healthz")
    except BaseException:
        operator.stop()
        raise
    return operator
