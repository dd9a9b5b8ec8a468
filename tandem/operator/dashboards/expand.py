"""Grafana's variable expansion for Prometheus queries, so a query can run without Grafana.

What Grafana 11 does before it sends a panel's query (public/app/features/templating and the Prometheus
data source): `$__interval` is the time range over the panel's data points, rounded to a "nice" step and
at least the data source's scrape interval; `$__rate_interval` is max($__interval + scrape interval,
4 x scrape interval); `$__range` is the whole range; a template variable becomes its value, regex-escaped
for `=~` matchers, `(a|b)` when several are selected, and the variable's allValue (`.*`) for All.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: Grafana's rounding of a raw interval (kbn.roundInterval): (below this many ms, use this many ms).
_ROUNDING = (
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
    (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
    (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
    (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
    (32400000, 21600000), (86400000, 43200000),
)  # fmt: skip
ALL = ".*"


def round_interval(ms: float) -> float:
    for below, nice in _ROUNDING:
        if ms < below:
            return nice
    return 86400000


def duration(seconds: float) -> str:
    """A Prometheus duration (`4s`, `1500ms`, `2m`)."""
    ms = round(seconds * 1000)
    if ms % 60000 == 0:
        return f"{ms // 60000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


@dataclass(frozen=True)
class Context:
    """A dashboard view: the time range, the data source's scrape interval, the variables' values
    (a string, several strings, or ALL)."""

    start: float
    end: float
    scrape_interval: float = 15.0
    max_data_points: int = 1000
    variables: Mapping[str, str | Sequence[str]] = field(default_factory=dict)

    @property
    def interval(self) -> float:
        """`$__interval`, seconds."""
        raw_ms = (self.end - self.start) * 1000 / self.max_data_points
        return max(round_interval(raw_ms) / 1000, self.scrape_interval)

    @property
    def rate_interval(self) -> float:
        """`$__rate_interval`, seconds."""
        return max(self.interval + self.scrape_interval, 4 * self.scrape_interval)


def regex_escape(value: str) -> str:
    """Grafana's escaping of a value for a Prometheus regex matcher (prometheusRegularEscape): the
    regex's special characters get a backslash, written doubled inside the PromQL string."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def _value(value: str | Sequence[str]) -> str:
    if isinstance(value, str):
        return value if value == ALL else regex_escape(value)
    values = [regex_escape(v) for v in value]
    return values[0] if len(values) == 1 else "(" + "|".join(values) + ")"


def expand(expr: str, context: Context) -> str:
    """`expr` as Grafana sends it to Prometheus in `context`."""
    builtins = {
        "__rate_interval": duration(context.rate_interval),
        "__interval": duration(context.interval),
        "__range": duration(context.end - context.start),
    }
    values = {**{k: _value(v) for k, v in context.variables.items()}, **builtins}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"variable ${name} has no value: give it one (known: {', '.join(sorted(values))})")
        return values[name]

    # `$1` (a label_replace group) is not a variable: names start with a letter or an underscore.
    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", replace, expr)
