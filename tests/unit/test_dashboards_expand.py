"""Grafana's expansion of dashboard variables, as the dashboards' queries are run without Grafana."""

from __future__ import annotations

import pytest

from tandem.operator.dashboards.expand import ALL, Context, duration, expand, round_interval


def test_interval_and_rate_interval_follow_grafana() -> None:
    # One hour over 1,000 points is 3.6 s raw, rounded to 2 s, below a 15 s scrape interval: 15 s.
    hour = Context(start=0, end=3600, scrape_interval=15, max_data_points=1000)
    assert hour.interval == 15
    assert hour.rate_interval == 60  # max(15 + 15, 4 x 15)
    # A day over 1,000 points: 86.4 s raw -> 1m; $__rate_interval = 1m + 15 s.
    day = Context(start=0, end=86400, scrape_interval=15, max_data_points=1000)
    assert day.interval == 60
    assert day.rate_interval == 75
    assert round_interval(300) == 200
    assert duration(75) == "75s"
    assert duration(60) == "1m"
    assert duration(0.2) == "200ms"


def test_variables_expand_to_regexes_as_grafana_writes_them() -> None:
    context = Context(start=0, end=600, scrape_interval=1, variables={"namespace": "team.a", "service": ALL})
    expr = 'rate(x{namespace=~"$namespace",service=~"${service}"}[$__rate_interval])'
    assert expand(expr, context) == 'rate(x{namespace=~"team\\\\.a",service=~".*"}[4s])'
    several = Context(start=0, end=600, variables={"namespace": ["a", "b"]})
    assert expand('x{namespace=~"$namespace"}', several) == 'x{namespace=~"(a|b)"}'
    # `$1` in a label_replace is not a variable.
    assert (
        expand('label_replace(x, "a", "$1", "b", "(.*)")', several)
        == 'label_replace(x, "a", "$1", "b", "(.*)")'
    )


def test_a_variable_without_a_value_is_named() -> None:
    with pytest.raises(KeyError, match=r"\$model has no value"):
        expand('x{model=~"$model"}', Context(start=0, end=60))
