"""`python -m tandem.operator.dashboards [--check]`: regenerate (or check) the dashboards and rules."""

from __future__ import annotations

import argparse
import sys

from tandem.operator.dashboards import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.operator.dashboards",
        description="Write the Grafana dashboards (charts/tandem/dashboards/*.json) and the Prometheus rules "
        "(charts/tandem/files/prometheus-rules.yaml) from tandem/operator/dashboards.",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed files differ (CI drift check)"
    )
    args = parser.parse_args(argv)
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
