"""`promtool check metrics` on a live /metrics endpoint (Debian's prometheus package)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request


def check_metrics(url: str) -> None:
    """Fail with promtool's complaints unless the exposition at `url` is clean."""
    with urllib.request.urlopen(url, timeout=10) as response:
        exposition = response.read().decode()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH: `make system-tools` installs Debian's prometheus package"
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"promtool check metrics {url}:\n{result.stdout}{result.stderr}"
