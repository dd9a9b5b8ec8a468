"""The machine's processes, for tests that check nothing of theirs is left running."""

from __future__ import annotations

from pathlib import Path


def processes() -> dict[int, str]:
    """pid -> command line of every process on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found
