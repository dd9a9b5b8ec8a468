"""A real S3-compatible HTTP server for tests: moto's server (`python -m moto.server`) as a child process.

No real S3 is reachable where the tests run, so moto plays it: boto3 talks HTTP to it exactly as to AWS S3
or MinIO (signed requests, listing, ranged GETs), through `AWS_ENDPOINT_URL`.

    with MotoS3Server() as s3:
        env = s3.env()              # AWS_ENDPOINT_URL, test credentials, region
        s3.client().create_bucket(Bucket="models")

Needs the `moto[server]` package (the `dev` extra).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any

ACCESS_KEY = "tandem-test-key"
SECRET_KEY = "tandem-test-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MotoS3Server:
    def __init__(self, *, startup_timeout_s: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        # moto logs every request: a file never fills up and blocks the server as a pipe would.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)

    def env(self) -> dict[str, str]:
        """The environment a client of this server needs (credentials are not checked by moto)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 S3 client of this server (made once; boto3 clients are thread-safe)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.url,
                region_name=REGION,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
            )
        return self._client

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> MotoS3Server:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._answers():
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer on {self.url} in {self.startup_timeout_s} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None
        self._log.close()

    def log(self) -> str:
        """The end of the server's output."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
