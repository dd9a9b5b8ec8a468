"""`python -m tandem.operator.dashboards [--check]`: regenerate (or check) the dashboards and rules;
`... render --prometheus-url URL --output-dir DIR`: draw each dashboard from a Prometheus to PNG."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tandem.operator.cost_cli import duration
from tandem.operator.dashboards import build


def _render(args: argparse.Namespace) -> int:
    from tandem.operator.dashboards import layout
    from tandem.operator.dashboards.expand import ALL, Context
    from tandem.operator.dashboards.render import draw, query_dashboard

    variables: dict[str, str] = {}
    for pair in args.set or ():
        name, sep, value = pair.partition("=")
        if not sep:
            print(f"--set {pair!r}: give NAME=VALUE, e.g. --set namespace=ml", file=sys.stderr)
            return 2
        variables[name] = value
    end = time.time()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for board in layout.DASHBOARDS:
        names = {v.name for v in board.variables}
        context = Context(
            start=end - args.range,
            end=end,
            scrape_interval=args.scrape_interval,
            variables={name: variables.get(name, ALL) for name in names},
        )
        path = args.output_dir / board.file.replace(".json", ".png")
        draw(board, query_dashboard(args.prometheus_url, board, context), path)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.operator.dashboards",
        description="Write the Grafana dashboards (charts/tandem/dashboards/*.json) and the Prometheus rules "
        "(charts/tandem/files/prometheus-rules.yaml) from tandem/operator/dashboards; or, with `render`, "
        "draw each dashboard from a Prometheus to PNG (no Grafana needed).",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed files differ (CI drift check)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    render = commands.add_parser("render", help="run every panel's queries on a Prometheus and draw PNGs")
    render.add_argument("--prometheus-url", required=True, metavar="URL", help="e.g. http://localhost:9090")
    render.add_argument("--output-dir", type=Path, required=True, help="where the PNGs go")
    render.add_argument("--range", type=duration, default=3600.0, metavar="DURATION", help="time range (1h)")
    render.add_argument(
        "--scrape-interval",
        type=duration,
        default=15.0,
        metavar="DURATION",
        help="the data source's scrape interval, as Grafana's data source setting (15s)",
    )
    render.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="a variable's value (default: All), e.g. namespace=ml",
    )
    args = parser.parse_args(argv)
    if args.command == "render":
        return _render(args)
    if args.check:
        stale = build.stale()
        for path in stale:
            print(f"out of date: {path}; run `python -m tandem.operator.dashboards`", file=sys.stderr)
        return 1 if stale else 0
    for path in build.write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
