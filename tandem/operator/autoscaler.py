"""The builtin autoscaler's decision, as a pure function of a metric time series and the clock.

Modelled on Knative's KPA: the load is averaged over a stable window (default 60 s) and a short panic
window (6 s). Normally the replica count follows the stable average; when the panic-window average
exceeds `panic_threshold` x the capacity of the ready replicas (target x replicas), the autoscaler
panics: it follows the panic average and never scales down until the load has stayed under the
threshold for a whole stable window. Scale-down takes the highest recommendation of the last
`scale_down_delay` seconds (so a dip does not remove replicas that are needed again a minute later);
scale-up is limited to `max_scale_up_rate` x the current count per decision; a change within
`tolerance` of the current capacity is ignored (like the HPA), which keeps noisy steady load from
flapping the count. Everything is clamped to [min, max].

Additive metrics (concurrency, queueDepth, rps) are the total over all replicas; desired replicas =
ceil(total / target). latencyP99 is not additive: desired = ceil(ready x p99 / target) (proportional,
like the HPA), so a p99 twice the target doubles the replicas.

No I/O and no clock here: `decide(policy, samples, now, current, ready, state)` returns the decision
and the next state, so years of traffic can be replayed in a unit test in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

ADDITIVE_METRICS = ("concurrency", "queueDepth", "rps")
#: Default target per replica when a service sets none: in-flight requests, queued items, req/s, ms.
DEFAULT_TARGETS = {"concurrency": 8.0, "queueDepth": 4.0, "rps": 20.0, "latencyP99": 250.0}


@dataclass(frozen=True)
class Policy:
    """How one service scales (from `spec.autoscaling` and `spec.replicas`)."""

    metric: str = "concurrency"
    target: float = 8.0
    stable_window: float = 60.0
    panic_window: float = 6.0
    scale_down_delay: float = 300.0
    max_scale_up_rate: float = 2.0
    min_replicas: int = 1
    max_replicas: int = 1
    #: Panic when the panic-window load is at least this multiple of the ready replicas' capacity.
    panic_threshold: float = 2.0
    #: Most replicas removed by one decision, as a divisor of the current count (Knative's default).
    max_scale_down_rate: float = 2.0
    #: Changes within this fraction of the current capacity are ignored (HPA's default is 0.1).
    tolerance: float = 0.1

    @property
    def additive(self) -> bool:
        return self.metric in ADDITIVE_METRICS


@dataclass(frozen=True)
class Sample:
    """One observation: the metric (total over replicas, or p99 ms) and the replicas ready then."""

    time: float
    value: float
    ready: int = 1


@dataclass(frozen=True)
class State:
    """What the autoscaler remembers between decisions."""

    #: When panic mode started (None: not panicking) and when the load was last over the threshold.
    panic_since: float | None = None
    last_over_threshold: float | None = None
    #: The highest count decided while panicking (panic never scales down).
    panic_replicas: int = 0
    #: (time, recommended replicas) within the scale-down delay.
    recommendations: tuple[tuple[float, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Decision:
    """The replicas wanted now, and why, with the numbers behind it."""

    replicas: int
    state: State
    reason: str
    stable_value: float | None
    panic_value: float | None
    panicking: bool

    def describe(self, policy: Policy, current: int) -> str:
        """A one-line account for events and conditions."""
        if self.stable_value is None:
            return f"no {policy.metric} samples in the last {policy.stable_window:g}s: holding {current}"
        unit = " ms" if policy.metric == "latencyP99" else ""
        mode = "panic" if self.panicking else "stable"
        return (
            f"{self.reason}: {policy.metric} {self.stable_value:.1f}{unit} over {policy.stable_window:g}s, "
            f"{self.panic_value or 0:.1f}{unit} over {policy.panic_window:g}s; target {policy.target:g}"
            f"{unit} per replica; {mode} mode; {current} -> {self.replicas} replicas"
        )


def window_average(samples: Sequence[Sample], now: float, window: float) -> tuple[float, float] | None:
    """(mean value, mean ready replicas) of the samples in (now - window, now]; None if there are none."""
    inside = [s for s in samples if now - window < s.time <= now]
    if not inside:
        return None
    return sum(s.value for s in inside) / len(inside), sum(s.ready for s in inside) / len(inside)


def _wanted(policy: Policy, value: float, ready: float) -> float:
    """Replicas (fractional) that would bring the metric to its target."""
    if policy.additive:
        return value / policy.target
    return max(ready, 1.0) * value / policy.target


def _round(policy: Policy, wanted: float, current: int) -> int:
    """Whole replicas; within the tolerance of the current count, the current count."""
    if current > 0 and abs(wanted / current - 1.0) <= policy.tolerance:
        return current
    return math.ceil(wanted - 1e-9)


def decide(
    policy: Policy,
    samples: Sequence[Sample],
    now: float,
    current: int,
    ready: int,
    state: State,
) -> Decision:
    """Desired replicas at time `now`, given the samples so far and the count running now."""
    floor = max(policy.min_replicas, 1)  # the builtin autoscaler never scales to zero: no metrics there
    stable = window_average(samples, now, policy.stable_window)
    panic = window_average(samples, now, policy.panic_window)
    if stable is None or panic is None:
        bounded = min(max(current, floor), policy.max_replicas)
        reason = "NoMetrics" if bounded == current else "OutOfBounds"
        return Decision(bounded, state, reason, None, None, state.panic_since is not None)

    stable_wanted = _wanted(policy, *stable)
    panic_wanted = _wanted(policy, *panic)
    base = max(current, 1)
    max_up = math.ceil(policy.max_scale_up_rate * base)
    max_down = math.floor(base / policy.max_scale_down_rate)
    # Scale-up is rate-limited here; scale-down after the delay window (below), so that a slow step
    # down is not held back once per step by the window.
    stable_count = min(_round(policy, stable_wanted, current), max_up)
    panic_count = min(_round(policy, panic_wanted, current), max_up)

    capacity_replicas = max(ready, 1)
    over = panic_wanted / capacity_replicas >= policy.panic_threshold
    panic_since, last_over = state.panic_since, state.last_over_threshold
    if over:
        last_over = now
        if panic_since is None:
            panic_since = now
    elif panic_since is not None and last_over is not None and now - last_over >= policy.stable_window:
        panic_since = None

    panicking = panic_since is not None
    # Panic follows the short window and never scales down; otherwise the stable window decides. With
    # less than a panic window of data (a fresh start), only a burst may change the count.
    span = now - min(s.time for s in samples if now - policy.stable_window < s.time <= now)
    if panicking:
        wanted = max(panic_count, state.panic_replicas, current)
    elif span < policy.panic_window:
        wanted = current
    else:
        wanted = stable_count
    recommendations = tuple(
        (t, r) for t, r in (*state.recommendations, (now, wanted)) if now - t <= policy.scale_down_delay
    )
    delayed = max(r for _, r in recommendations)  # scale down only to the highest recent recommendation
    final = min(max(delayed, max_down, floor), policy.max_replicas)
    if final > current:
        reason = "PanicScaleUp" if panicking else "ScaleUp"
    elif final < current:
        reason = "ScaleDown"
    elif panicking:
        reason = "Panic"
    elif max(delayed, max_down) > wanted:
        reason = "ScaleDownDelay"
    else:
        reason = "Stable"
    new_state = replace(
        state,
        panic_since=panic_since,
        last_over_threshold=last_over,
        panic_replicas=wanted if panicking else 0,
        recommendations=recommendations,
    )
    return Decision(final, new_state, reason, round(stable[0], 3), round(panic[0], 3), panicking)


def prune(samples: Sequence[Sample], now: float, policy: Policy) -> list[Sample]:
    """The samples any later decision can still use (the stable window, and the panic one within it)."""
    horizon = max(policy.stable_window, policy.panic_window)
    return [s for s in samples if now - s.time < horizon]
