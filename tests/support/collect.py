"""A line reader for watch tests: keeps what it is handed, asks to stop after `limit` lines."""

from __future__ import annotations


class Collect:
    def __init__(self, limit: int | None = None) -> None:
        self.lines: list[bytes] = []
        self.limit = limit

    def __call__(self, line: bytes) -> bool:
        self.lines.append(line)
        return self.limit is None or len(self.lines) < self.limit
