"""`tandem cost --plot`: cumulative training and serving spend per model, projected to the crossover.

matplotlib is imported here only (it is a plotting extra, not something the operator image needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tandem.errors import UserError
from tandem.operator.cost_report import ModelCost, ModelHistory, Series


def _times(series: Series) -> list[datetime]:
    return [datetime.fromtimestamp(t, UTC) for t, _ in series.points]


def plot(histories: Sequence[ModelHistory], rows: Sequence[ModelCost], now: datetime, path: Path) -> None:
    """One panel per model: spend to date (solid), the projection at the current rates (dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from error
    by_model = {row.model: row for row in rows}
    shown = [h for h in histories if h.training_usd.points or h.serving_usd.points] or list(histories)
    if not shown:
        raise UserError("--plot: no spend to draw")
    figure, axes = plt.subplots(len(shown), 1, figsize=(9, 3.2 * len(shown)), squeeze=False)
    for axis, history in zip(axes[:, 0], shown, strict=True):
        row = by_model[history.model]
        for series, label, colour in (
            (history.training_usd, "training", "tab:blue"),
            (history.serving_usd, "serving", "tab:orange"),
        ):
            if series.points:
                axis.plot(_times(series), [v for _, v in series.points], label=label, color=colour)
        if row.crossover is not None and not row.crossed:
            end = row.crossover
            hours = (end - now).total_seconds() / 3600
            axis.plot(
                [now, end],
                [row.serving_usd, row.serving_usd + row.serving_usd_per_hour * hours],
                "--",
                color="tab:orange",
                label="serving, projected",
            )
            axis.plot(
                [now, end],
                [row.training_usd, row.training_usd + row.training_usd_per_hour * hours],
                "--",
                color="tab:blue",
            )
        if row.crossover is not None:
            level = history.training_usd.at(row.crossover.timestamp()) if row.crossed else None
            if level is None:
                hours = (row.crossover - now).total_seconds() / 3600
                level = row.training_usd + row.training_usd_per_hour * hours
            axis.plot([row.crossover], [level], "o", color="tab:red", label="crossover")
            x = mdates.date2num(row.crossover)  # type: ignore[no-untyped-call]
            axis.annotate(
                row.crossover.strftime("%Y-%m-%d %H:%M"),
                (x, level),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
            )
        axis.set_title(f"model {history.model or '(no TrainingJob)'}: cumulative spend")
        axis.set_ylabel("US dollars")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
        locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
        axis.xaxis.set_major_locator(locator)
        axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
