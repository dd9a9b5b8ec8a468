"""Per model: what training cost, what serving costs so far and per request, and when serving overtakes.

Pure arithmetic on histories, so `tandem cost` gives the same answer whether the histories come from
Prometheus (the operator's `tandem_cost_usd_total` counters and the replicas' request and token counters)
or from the resources' status (a history of one point and the rate now). The projection is linear: at
the rates of the last `window` seconds, serving spend S + s*t meets training spend T + r*t at
t = (T - S) / (s - r); no crossover is projected when s <= r. Once every TrainingJob of the model has
ended, r is 0 whatever the window saw (its spend is fixed): right after training ends, the window still
holds the job's last hour of spend, which would put the crossover off. A counter that was still at 0
inside the window (serving that began a few minutes ago) is measured from when it left 0, so its rate is
right from the moment it starts spending rather than diluted over the whole window.

Each row also says how its hourly cost is allocated now (the operator's `tandem_cost_containers`):
`usage` when every container on a node is charged max(request, measured usage), `requests` when none
has usage (kwok nodes, no kubelet scrape, Prometheus down), `usage N/M` in between, `-` when nothing
of the model is on a node or the source (the status) does not record it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tandem.operator.cost import SECONDS_PER_HOUR, per_million

#: The rate window when none is given: the last hour of traffic.
DEFAULT_WINDOW_SECONDS = 3600.0


@dataclass(frozen=True)
class Series:
    """A cumulative quantity over time: (Unix seconds, value) in time order."""

    points: tuple[tuple[float, float], ...] = ()

    @classmethod
    def line(
        cls, now: float, value: float, per_second: float, span: float = DEFAULT_WINDOW_SECONDS
    ) -> Series:
        """The history that a status gives: the value now, reached at `per_second` over the last `span`
        (or since it left 0, if `per_second` gets there from 0 in less than `span`)."""
        if per_second > 0 and value < per_second * span:
            return cls(((now - value / per_second, 0.0), (now, value)))
        return cls(((now - span, max(value - per_second * span, 0.0)), (now, value)))

    @property
    def last(self) -> float:
        return self.points[-1][1] if self.points else 0.0

    def at(self, when: float) -> float:
        """The value at `when`, linear between points (the first value before, the last after)."""
        if not self.points:
            return 0.0
        previous = self.points[0]
        if when <= previous[0]:
            return previous[1]
        for point in self.points[1:]:
            if when <= point[0]:
                (t0, v0), (t1, v1) = previous, point
                return v0 + (v1 - v0) * (when - t0) / (t1 - t0) if t1 > t0 else v1
            previous = point
        return previous[1]

    def _left_zero(self) -> float:
        """The last time the counter was still at 0 (-inf if it never was): a counter only grows, so
        before then it had counted nothing."""
        zero = float("-inf")
        for when, value in self.points:
            if value > 0:
                break
            zero = when
        return zero

    def rate(self, window: float) -> float:
        """Increase per second over the last `window` seconds of the history, or since the counter
        left 0 if that is later (0 without two points)."""
        if len(self.points) < 2:
            return 0.0
        end = self.points[-1][0]
        start = max(end - window, self.points[0][0], self._left_zero())
        if end <= start:
            return 0.0
        return max(self.last - self.at(start), 0.0) / (end - start)


@dataclass(frozen=True)
class Allocation:
    """The containers of a model on nodes now, and how many are charged by measured usage."""

    containers: int = 0
    measured: int = 0

    def describe(self) -> str:
        if self.containers <= 0:
            return "-"
        if self.measured >= self.containers:
            return "usage"
        return "requests" if self.measured <= 0 else f"usage {self.measured}/{self.containers}"


@dataclass(frozen=True)
class ModelHistory:
    """What one model cost and served: cumulative dollars of training and of serving, requests, tokens."""

    model: str
    training_usd: Series
    serving_usd: Series
    requests: Series
    tokens: Series
    #: Every TrainingJob of the model has ended (Succeeded, Failed or deleted): training spend is fixed,
    #: and its rate is 0 whatever the window saw.
    training_ended: bool = False
    #: How its cost is allocated now (None: the source does not say).
    allocation: Allocation | None = None
    #: Without container counts (the status source): its resources' `cost.allocation`, combined.
    allocation_basis: str | None = None


@dataclass(frozen=True)
class ModelCost:
    """The report's row for one model."""

    model: str
    training_usd: float
    serving_usd: float
    training_usd_per_hour: float
    serving_usd_per_hour: float
    usd_per_million_requests: float | None
    usd_per_million_tokens: float | None
    #: When serving spend passed (crossed=True) or will pass training spend; None: not at these rates.
    crossover: datetime | None
    crossed: bool
    #: `usage`, `requests`, `usage N/M` or `-` (Allocation.describe).
    allocation: str = "-"

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "trainingUSD": round(self.training_usd, 4),
            "servingUSD": round(self.serving_usd, 4),
            "trainingUSDPerHour": round(self.training_usd_per_hour, 4),
            "servingUSDPerHour": round(self.serving_usd_per_hour, 4),
            "usdPerMillionRequests": _round(self.usd_per_million_requests),
            "usdPerMillionTokens": _round(self.usd_per_million_tokens),
            "crossover": self.crossover.isoformat() if self.crossover else None,
            "crossed": self.crossed,
            "allocation": self.allocation,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _first_crossing(history: ModelHistory) -> float | None:
    """The first time in the history at which serving spend reached training spend (a positive one)."""
    times = sorted({t for t, _ in history.training_usd.points} | {t for t, _ in history.serving_usd.points})
    for when in times:
        training = history.training_usd.at(when)
        if training > 0 and history.serving_usd.at(when) >= training:
            return when
    return None


def summarize(history: ModelHistory, now: datetime, window: float = DEFAULT_WINDOW_SECONDS) -> ModelCost:
    """One model's spend so far, its rates over the last `window` seconds, and the crossover."""
    training, serving = history.training_usd.last, history.serving_usd.last
    r = 0.0 if history.training_ended else history.training_usd.rate(window)
    s = history.serving_usd.rate(window)
    serving_hourly = s * SECONDS_PER_HOUR
    crossover: datetime | None = None
    crossed = training > 0 and serving >= training
    if crossed:
        when = _first_crossing(history)
        crossover = datetime.fromtimestamp(when, UTC) if when is not None else now
    elif training > 0 and s > r:
        crossover = now + timedelta(seconds=(training - serving) / (s - r))
    return ModelCost(
        model=history.model,
        training_usd=training,
        serving_usd=serving,
        training_usd_per_hour=r * SECONDS_PER_HOUR,
        serving_usd_per_hour=serving_hourly,
        usd_per_million_requests=per_million(serving_hourly, history.requests.rate(window)),
        usd_per_million_tokens=per_million(serving_hourly, history.tokens.rate(window)),
        crossover=crossover,
        crossed=crossed,
        allocation=history.allocation.describe() if history.allocation else history.allocation_basis or "-",
    )


def report(
    histories: Sequence[ModelHistory], now: datetime, window: float = DEFAULT_WINDOW_SECONDS
) -> list[ModelCost]:
    """Every model's row, by model name."""
    return [summarize(h, now, window) for h in sorted(histories, key=lambda h: h.model)]


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def table(rows: Sequence[ModelCost]) -> str:
    """The rows as an aligned text table."""
    header = (
        "MODEL",
        "TRAINING",
        "SERVING",
        "SERVING/H",
        "PER 1M REQ",
        "PER 1M TOK",
        "SERVING PASSES TRAINING",
        "ALLOCATION",
    )
    lines = [header]
    for row in rows:
        if row.crossover is None:
            when = "no training spend" if row.training_usd <= 0 else "not at the current rate"
        else:
            when = ("passed " if row.crossed else "") + row.crossover.strftime("%Y-%m-%d %H:%M UTC")
        lines.append(
            (
                row.model or "(no TrainingJob)",
                _usd(row.training_usd),
                _usd(row.serving_usd),
                _usd(row.serving_usd_per_hour),
                _usd(row.usd_per_million_requests),
                _usd(row.usd_per_million_tokens),
                when,
                row.allocation,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
