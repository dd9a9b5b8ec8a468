"""Run `tandem serve` as a child process on a free loopback port (for tests and benchmarks).

    with ServerProcess(["--runtime", "embeddings", "--model-uri", path]) as server:
        httpx.post(f"{server.url}/v1/embeddings", json={"input": "hi"})

The child binds port 0 and logs its address; `start` reads that line, then waits until
`/v2/health/ready` answers 200 (or the child exits, which raises with the end of its log). With
`--workers N` the child is the supervisor: readiness is 200 once every worker is ready, and `worker_pids`
lists the workers' process ids (from the supervisor's "worker i/N started (pid P)" lines).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import TracebackType

_ADDRESS = re.compile(r"on (http://[^\s;]+)")
_WORKER = re.compile(r"tandem serve: worker \d+/\d+ started \(pid (\d+)\)")


class ServerProcess:
    def __init__(
        self,
        args: Sequence[str],
        *,
        startup_timeout_s: float = 180.0,
        env: dict[str, str] | None = None,
        source: str | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """`source`: a folder holding another copy of the `tandem` package (e.g. `git archive` of an older
        commit) to serve from instead of this checkout, for before/after benchmarks in one run; the server
        runs in that folder with it first on PYTHONPATH, so that copy is found first (before the editable
        install). `command`: what runs the server instead of `python -m tandem.workloads.serve` (e.g.
        `[sys.executable, "bench/serve_variant.py"]`), given the same arguments."""
        self.args = [*args, "--host", "127.0.0.1", "--port", "0"]
        self.source = source
        self.command = list(command or [sys.executable, "-m", "tandem.workloads.serve"])
        self.startup_timeout_s = startup_timeout_s
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        if source is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, self.env.get("PYTHONPATH")]))
        self.lines: list[str] = []
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._address = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "start() first"
        return self._proc.pid

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids with `--workers` > 1 (empty for a single-process server)."""
        return [int(m.group(1)) for line in list(self.lines) if (m := _WORKER.search(line))]

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line)
            match = _ADDRESS.search(line)
            if match and not self.url:
                self.url = match.group(1)
                self._address.set()
        self._address.set()  # the child exited

    def start(self) -> ServerProcess:
        self._proc = subprocess.Popen(
            [*self.command, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.source,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout_s
        if not self._address.wait(self.startup_timeout_s) or not self.url:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"the server did not start:\n{self.log()}")
        while not self.is_ready():
            if self._proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self._proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"the server was not ready in {self.startup_timeout_s:g} s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text: str = response.read().decode()
        return text

    def metric(self, sample: str, **labels: str) -> float:
        """The sum of the `/metrics` samples named `sample` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def send_signal(self, sig: int) -> None:
        assert self._proc is not None, "start() first"
        self._proc.send_signal(sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self._proc is not None, "start() first"
        code = self._proc.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal the child and wait for it (SIGKILL if it outlives `timeout_s`); its exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                return self.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self.wait(timeout_s)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
