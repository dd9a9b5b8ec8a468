"""`tandem cost`: per model, training spend, serving spend, cost per request and token, the crossover."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.errors import UserError

COST_HELP = """\
Per model (the TrainingJob whose weights are served): what training cost, what serving has cost so far,
serving's cost per hour, per million requests and per million tokens, and the date when serving spend
passes training spend at the current rates (the rates of the last --window; a model whose
TrainingJobs have all ended adds no more training spend).

Reads the operator's cost counters and the replicas' request and token counters from Prometheus
(--prometheus-url); without it, or when Prometheus does not answer, reads the TrainingJobs' and
InferenceServices' status through the kubeconfig (the spend and rate now, no history).

Cost is allocated as OpenCost does: per container, max(request, usage) x hourly price, for vCPUs and
memory; GPUs by request (reserved whole). ALLOCATION says which: `usage` (the kubelet's usage series
were in Prometheus for every container), `requests` (none: kwok nodes, no kubelet scrape, Prometheus
down), `usage N/M`, or `-` (nothing on a node now, or read from the status, which does not record it).

Examples:
  tandem cost --prometheus-url http://prometheus.monitoring:9090
  tandem cost --namespace ml --output json
  tandem cost --prometheus-url http://localhost:9090 --plot spend.png
"""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """`90s`, `30m`, `1h`, `7d` -> seconds (argparse type)."""
    match = _DURATION.match(text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 1h or 7d")
    return float(match[1]) * _UNITS[match[2]]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    cost = subparsers.add_parser(
        "cost",
        help="training vs serving spend per model, and when serving overtakes training",
        description=COST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cost.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="Prometheus HTTP API, e.g. http://prometheus:9090 (default: the resources' status, kubeconfig)",
    )
    cost.add_argument("--namespace", "-n", help="only this namespace (default: all)")
    cost.add_argument(
        "--window",
        type=duration,
        default=3600.0,
        metavar="DURATION",
        help="the rates (per hour, per request, the projection) are those of this last span (default 1h)",
    )
    cost.add_argument(
        "--history",
        type=duration,
        default=86400.0,
        metavar="DURATION",
        help="span of Prometheus history read and plotted (default 24h; at least --window)",
    )
    cost.add_argument("--output", "-o", choices=("table", "json"), default="table", help="output format")
    cost.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw cumulative spend per model, crossover marked"
    )
    cost.set_defaults(handler=_cost)


async def _read(args: argparse.Namespace, now: datetime) -> tuple[list[Any], str, str]:
    """The histories, where they came from, and the usage note: every call on one event loop and the
    operator's one HTTP client (`kubehttp`)."""
    from tandem.operator import cost_sources

    if args.prometheus_url:
        try:
            histories = await cost_sources.from_prometheus(
                args.prometheus_url, args.namespace, now, max(args.history, args.window), args.window
            )
            return histories, "prometheus", await _usage_note(args.prometheus_url)
        except ConnectionError as error:
            print(f"{error}; reading the resources' status instead", file=sys.stderr)
    return await cost_sources.from_status(args.namespace, now), "status", await _usage_note(None)


def _cost(args: argparse.Namespace) -> int:
    from tandem.operator import cost_report, kubehttp

    now = datetime.now(UTC)
    histories, source, usage = kubehttp.run(_read(args, now))
    rows = cost_report.report(histories, now, args.window)
    if args.output == "json":
        document = {"source": source, "time": now.isoformat(), "models": [r.to_dict() for r in rows]}
        print(json.dumps(document | {"usage": usage}, indent=2))
    else:
        if rows:
            print(cost_report.table(rows))
        else:
            print(
                "no TrainingJob or InferenceService spend found"
                + (f" in {args.namespace}" if args.namespace else "")
            )
        print(f"\nallocation: {usage}")
    if args.plot is not None:
        if args.plot.suffix.lower() != ".png":
            raise UserError(f"--plot {args.plot}: give a .png file name")
        from tandem.operator.cost_plot import plot

        plot(histories, rows, now, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


async def _usage_note(prometheus_url: str | None) -> str:
    """Whether usage is measured, as the operator reads it (the same queries, the same Prometheus)."""
    from tandem.operator import cost_usage

    if not prometheus_url:
        return (
            "max(request, usage) per container where the operator's Prometheus has the kubelet's usage "
            "series, requests elsewhere (each resource's status.cost.allocation: the ALLOCATION column); "
            "GPUs by request (reserved whole)"
        )
    snapshot = await cost_usage.read(cost_usage.prometheus_query(prometheus_url))
    if snapshot.problem:
        return snapshot.problem
    return (
        f"max(request, usage) per container; usage of {len(snapshot.pods)} pods in Prometheus "
        "(kubelet cAdvisor); GPUs by request (reserved whole)"
    )
