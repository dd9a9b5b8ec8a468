"""Chart fixtures: the pinned helm (built from gomod/helm on first use, then cached) and a renderer.

These tests need the Go toolchain but no cluster; a cold helm build takes a few minutes on two cores
(progress on the terminal), a warm one nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.devcluster import helm as devhelm

Render = Callable[..., list[dict[str, Any]]]


def _progress(message: str) -> None:
    print(f"[helm] {message}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="session")
def helm() -> Path:
    return devhelm.ensure_helm(_progress)


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`helm template` of charts/tandem with `--set` pairs, as a list of objects (CRDs left out)."""

    def _render(
        *sets: str, namespace: str = "tandem-system", values: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        args = ["template", "tandem", str(devhelm.CHART_DIR), "--namespace", namespace]
        for pair in sets:
            args += ["--set", pair]
        if values is not None:
            args += ["--values", "-"]
        text = devhelm.run_helm(helm, *args, stdin=None if values is None else yaml.safe_dump(values))
        return [doc for doc in yaml.safe_load_all(text) if doc]

    return _render
