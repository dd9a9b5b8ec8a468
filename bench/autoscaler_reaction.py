"""Autoscaler reaction time to a 4x load step, and replica changes under steady noisy load.

    .venv/bin/python bench/autoscaler_reaction.py                  # defaults: 2 s tick, 60 s / 6 s windows
    .venv/bin/python bench/autoscaler_reaction.py --tick-s 1 --ready-lag-s 5

Replays synthetic load through the operator's own decision function (`tandem.operator.autoscaler`), at
the operator's tick, with replicas becoming ready `--ready-lag-s` after each decision. Reports:

- reaction: seconds from a 4x step (2 -> 8 replicas' worth of concurrency) until the decision reaches the
  right count (goal <= 10 s; Knative's panic window is 6 s, the HPA's sync period 15 s). Add up to one
  reconcile interval (2 s) for the Deployment to follow the decision in a cluster.
- changes: replica changes over an hour of steady load with per-sample noise (goal 0), per noise level.

Pure computation: no cluster, no clock; the numbers are exact for the given series, so they are
reproducible on any machine. The composed end-to-end test measures the same path with real parts.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
from collections.abc import Callable

from tandem.operator.autoscaler import Policy, Sample, State, decide, prune


def run(
    policy: Policy,
    load: Callable[[float], float],
    seconds: float,
    start: int,
    tick: float,
    ready_lag: float,
) -> list[tuple[float, int]]:
    """(time, replicas) after every decision."""
    samples: list[Sample] = []
    state = State()
    current = start
    decided: list[tuple[float, int]] = [(-1e9, start)]
    out = []
    now = 0.0
    while now <= seconds:
        ready = max(count for at, count in decided if at + ready_lag <= now)
        samples = prune([*samples, Sample(now, load(now), ready)], now, policy)
        decision = decide(policy, samples, now, current, ready, state)
        state = decision.state
        if decision.replicas != current:
            decided.append((now, decision.replicas))
            current = decision.replicas
        out.append((now, current))
        now += tick
    return out


def reaction(policy: Policy, tick: float, ready_lag: float, factor: float = 4.0) -> float | None:
    before, step_at = 2 * policy.target, 120.0
    history = run(
        policy,
        lambda t: before if t < step_at else before * factor,
        seconds=step_at + 120,
        start=2,
        tick=tick,
        ready_lag=ready_lag,
    )
    right = round(2 * factor)
    return next((t - step_at for t, count in history if t >= step_at and count >= right), None)


def changes_under_steady_load(policy: Policy, tick: float, noise: float, seed: int) -> int:
    rng = random.Random(seed)
    level = 4 * policy.target
    history = run(
        policy,
        lambda _t: level * (1 + rng.uniform(-noise, noise)),
        seconds=3600,
        start=4,
        tick=tick,
        ready_lag=0,
    )
    return sum(1 for (_, a), (_, b) in itertools.pairwise(history) if a != b)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tick-s", type=float, default=2.0, help="autoscaler tick (operator default 2)")
    parser.add_argument("--ready-lag-s", type=float, default=0.0, help="seconds until a new replica is ready")
    parser.add_argument("--stable-window-s", type=float, default=60.0)
    parser.add_argument("--panic-window-s", type=float, default=6.0)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    policy = Policy(
        metric="concurrency",
        target=10,
        stable_window=args.stable_window_s,
        panic_window=args.panic_window_s,
        min_replicas=1,
        max_replicas=32,
    )
    print(
        f"policy: target 10/replica, stable {policy.stable_window:g}s, panic {policy.panic_window:g}s, "
        f"tick {args.tick_s:g}s, ready lag {args.ready_lag_s:g}s"
    )
    for factor in (2.5, 4.0, 8.0):
        seconds = reaction(policy, args.tick_s, args.ready_lag_s, factor)
        shown = "never" if seconds is None else f"{seconds:.0f}s"
        print(f"reaction to a {factor:g}x step (2 -> {round(2 * factor)} replicas): {shown}")
    for noise in (0.1, 0.25, 0.5):
        counts = [changes_under_steady_load(policy, args.tick_s, noise, seed) for seed in range(args.seeds)]
        print(
            f"steady load +-{noise:.0%} noise, 1 h, {args.seeds} seeds: replica changes "
            f"mean {statistics.mean(counts):.1f}, max {max(counts)}"
        )


if __name__ == "__main__":
    main()
