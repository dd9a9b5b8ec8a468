"""Run a dashboard's queries against Prometheus as Grafana would, and draw the answers with matplotlib.

For a picture of what the panels show where no Grafana runs (the docs' PNGs; Grafana is AGPL and not
packaged here) and for the tests that check every panel's queries against a real Prometheus.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.operator.dashboards.expand import Context, expand
from tandem.operator.dashboards.layout import Dashboard
from tandem.operator.dashboards.queries import Panel

QUERY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Line:
    """One series of a panel: its legend and its (Unix time, value) points (NaN and Inf dropped)."""

    legend: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class PanelData:
    key: str
    panel: Panel
    #: The queries as sent (variables expanded).
    exprs: tuple[str, ...]
    lines: tuple[Line, ...]


def _legend(template: str, labels: Mapping[str, str]) -> str:
    """Grafana's legend: the template with {{label}} filled in; the labels when it comes out empty."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()
    if not text or template == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return text


def _get(base_url: str, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
    url = f"{base_url.rstrip('/')}{path}?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_SECONDS) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as error:  # Prometheus says why in the body (a bad query: 400)
        detail = error.read().decode()[:500]
        raise RuntimeError(f"Prometheus refused {params['query']!r}: {detail}") from error
    if reply.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {params['query']!r}: {reply.get('error')}")
    return list(reply["data"]["result"])


def _finite(points: list[list[Any]]) -> tuple[tuple[float, float], ...]:
    values = ((float(t), float(v)) for t, v in points)
    return tuple((t, v) for t, v in values if math.isfinite(v))


def query_panel(base_url: str, key: str, panel: Panel, context: Context) -> PanelData:
    """Every query of a panel: a range query stepping by $__interval, or an instant one at the end."""
    exprs, lines = [], []
    for query in panel.queries:
        expr = expand(query.expr, context)
        exprs.append(expr)
        if panel.instant:
            results = _get(base_url, "/api/v1/query", {"query": expr, "time": f"{context.end:.3f}"})
            for result in results:
                lines.append(Line(_legend(query.legend, result["metric"]), _finite([result["value"]])))
        else:
            params = {
                "query": expr,
                "start": f"{context.start:.3f}",
                "end": f"{context.end:.3f}",
                "step": f"{context.interval:.3f}",
            }
            for result in _get(base_url, "/api/v1/query_range", params):
                lines.append(Line(_legend(query.legend, result["metric"]), _finite(result["values"])))
    return PanelData(key, panel, tuple(exprs), tuple(line for line in lines if line.points))


def query_dashboard(base_url: str, board: Dashboard, context: Context) -> dict[str, PanelData]:
    return {key: query_panel(base_url, key, panel, context) for key, panel in board.panels.items()}


_UNIT_LABELS = {
    "s": "seconds",
    "reqps": "requests/s",
    "ops": "per second",
    "currencyUSD": "US dollars",
    "percentunit": "share (0-1)",
    "bytes": "bytes",
    "h": "hours",
    "short": "",
    "dateTimeAsIso": "",
    "none": "",
}


def _unit_label(unit: str) -> str:
    return unit.removeprefix("suffix:") if unit.startswith("suffix:") else _UNIT_LABELS.get(unit, unit)


def _format(value: float, unit: str) -> str:
    if unit == "dateTimeAsIso":
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if unit == "currencyUSD":
        return f"${value:,.4g}" if abs(value) < 1 else f"${value:,.2f}"
    if unit == "percentunit":
        return f"{value:.0%}"
    label = _unit_label(unit)
    return f"{value:.4g} {label}".strip()


def draw(board: Dashboard, data: Mapping[str, PanelData], path: Path) -> None:
    """The dashboard's rows and panels, laid out as in Grafana, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rows = board.rows
    columns = max(len(keys) for _, keys in rows)
    figure = plt.figure(figsize=(5.2 * columns, 3.1 * len(rows) + 0.6))
    figure.suptitle(board.title, fontsize=14, x=0.01, ha="left")
    grid = figure.add_gridspec(len(rows), 12)
    for r, (row_title, keys) in enumerate(rows):
        span = 12 // len(keys)
        for c, key in enumerate(keys):
            axis = figure.add_subplot(grid[r, c * span : (c + 1) * span])
            panel_data = data[key]
            panel = panel_data.panel
            axis.set_title(f"{row_title} · {panel.title}", fontsize=9, loc="left")
            if not panel_data.lines:
                axis.text(
                    0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey"
                )
                axis.set_xticks([])
                axis.set_yticks([])
                continue
            if panel.instant:
                axis.axis("off")
                text = "\n".join(
                    f"{line.legend}: {_format(line.points[-1][1], panel.unit)}"
                    for line in panel_data.lines[:8]
                )
                axis.text(0.02, 0.9, text, ha="left", va="top", transform=axis.transAxes, fontsize=10)
                continue
            for line in panel_data.lines[:10]:
                times: Any = [datetime.fromtimestamp(t, UTC) for t, _ in line.points]
                style = "--" if "SLO" in line.legend else "-"
                marker = "o" if len(line.points) == 1 else None  # one point draws no line
                axis.plot(
                    times, [v for _, v in line.points], style, label=line.legend, linewidth=1.2, marker=marker
                )
            axis.set_ylabel(_unit_label(panel.unit), fontsize=8)
            axis.tick_params(labelsize=7)
            axis.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=60)
    plt.close(figure)
