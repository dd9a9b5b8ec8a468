"""The builtin autoscaler on synthetic series: simulated time, no clock, no cluster."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from tandem.operator.autoscaler import Decision, Policy, Sample, State, decide, prune

TICK = 2.0


def simulate(
    policy: Policy,
    load: Callable[[float], float],
    seconds: float,
    start_replicas: int,
    ready_lag: float = 0.0,
    tick: float = TICK,
    start: float = 0.0,
) -> list[tuple[float, Decision]]:
    """Run the autoscaler every `tick` seconds; replicas become ready `ready_lag` seconds after a decision.

    `load(t)` is the metric total at time t (e.g. in-flight requests over all replicas).
    """
    samples: list[Sample] = []
    state = State()
    current = start_replicas
    changes: list[tuple[float, int]] = [(start - 1e9, start_replicas)]
    history = []
    now = start
    while now <= start + seconds:
        ready = max(count for at, count in changes if at + ready_lag <= now)
        samples.append(Sample(now, load(now), ready))
        samples = prune(samples, now, policy)
        decision = decide(policy, samples, now, current, ready, state)
        state = decision.state
        if decision.replicas != current:
            changes.append((now, decision.replicas))
            current = decision.replicas
        history.append((now, decision))
        now += tick
    return history


def replica_changes(history: list[tuple[float, Decision]], start: int) -> list[tuple[float, int]]:
    out = []
    current = start
    for now, decision in history:
        if decision.replicas != current:
            out.append((now, decision.replicas))
            current = decision.replicas
    return out


POLICY = Policy(metric="concurrency", target=10, min_replicas=1, max_replicas=20)


def step(before: float, after: float, at: float) -> Callable[[float], float]:
    return lambda t: before if t < at else after


@pytest.mark.parametrize("tick", [1.0, 2.0])
def test_a_4x_load_step_reaches_the_right_count_within_the_panic_window(tick: float) -> None:
    # 2 replicas at their target (20 in flight), then 4x: 80 in flight needs 8 replicas.
    history = simulate(POLICY, step(20, 80, at=120), seconds=240, start_replicas=2, tick=tick)
    changes = replica_changes(history, 2)
    assert changes, "no scale-up at all"
    first_up = changes[0][0]
    reached = next(t for t, count in changes if count == 8)
    assert 120 <= first_up <= 120 + POLICY.panic_window
    assert reached - 120 <= POLICY.panic_window, changes
    assert all(count <= 8 for _, count in changes), "overshoot"
    panicking = [d for t, d in history if 120 <= t <= reached]
    assert any(d.panicking for d in panicking)
    assert panicking[-1].reason == "PanicScaleUp"


def test_scale_up_rate_is_bounded_per_decision() -> None:
    history = simulate(POLICY, step(10, 200, at=60), seconds=120, start_replicas=1)
    counts = [1] + [count for _, count in replica_changes(history, 1)]
    for before, after in itertools.pairwise(counts):
        if after > before:
            assert after <= POLICY.max_scale_up_rate * before, counts
    assert counts[-1] == 20  # max


@pytest.mark.parametrize("seed", range(5))
def test_steady_noisy_load_changes_nothing_for_an_hour(seed: int) -> None:
    rng = random.Random(seed)
    # 40 in flight +-25% per sample (uniform): 4 replicas at target 10.
    history = simulate(POLICY, lambda _t: 40 * (1 + rng.uniform(-0.25, 0.25)), seconds=3600, start_replicas=4)
    assert replica_changes(history, 4) == []
    assert not any(d.panicking for _, d in history)


def test_steady_noisy_load_settles_once_then_holds_for_an_hour() -> None:
    rng = random.Random(7)
    history = simulate(POLICY, lambda _t: 57 * (1 + rng.uniform(-0.2, 0.2)), seconds=3900, start_replicas=1)
    after_warmup = [(t, d) for t, d in history if t >= 300]
    assert replica_changes(after_warmup, after_warmup[0][1].replicas) == []
    assert after_warmup[0][1].replicas in (6, 7)


def test_scale_down_waits_for_the_delay_and_the_load_to_stay_low() -> None:
    policy = Policy(metric="rps", target=10, scale_down_delay=300, min_replicas=1, max_replicas=10)
    history = simulate(policy, step(80, 10, at=100), seconds=900, start_replicas=8)
    changes = replica_changes(history, 8)
    assert changes, "never scaled down"
    first_down = changes[0][0]
    assert first_down >= 100 + 300 - TICK, changes  # not before the delay has passed
    assert changes[-1][1] == 1
    down_reasons = {d.reason for t, d in history if 100 < t < first_down}
    assert "ScaleDownDelay" in down_reasons


def test_a_short_dip_does_not_scale_down() -> None:
    policy = Policy(metric="rps", target=10, scale_down_delay=120, min_replicas=1, max_replicas=10)
    load = lambda t: 10 if 200 <= t < 260 else 50  # noqa: E731 - a one-minute dip
    history = simulate(policy, load, seconds=600, start_replicas=5)
    assert replica_changes(history, 5) == []


def test_min_and_max_bound_every_decision() -> None:
    policy = Policy(metric="concurrency", target=10, min_replicas=3, max_replicas=5, scale_down_delay=10)
    low = simulate(policy, lambda _t: 1, seconds=300, start_replicas=4)
    assert low[-1][1].replicas == 3
    high = simulate(policy, lambda _t: 500, seconds=300, start_replicas=4)
    assert high[-1][1].replicas == 5
    assert all(3 <= d.replicas <= 5 for _, d in low + high)


def test_panic_does_not_scale_down_until_a_stable_window_without_overload() -> None:
    policy = Policy(metric="concurrency", target=10, scale_down_delay=0, min_replicas=1, max_replicas=20)
    load = lambda t: 100 if 60 <= t < 70 else 10  # noqa: E731 - a 10 s burst
    history = simulate(policy, load, seconds=300, start_replicas=1)
    peak_time, peak = max(((t, d.replicas) for t, d in history), key=lambda item: item[1])
    assert peak >= 8
    # Still panicking (and holding) within a stable window of the burst, though the burst is over.
    holding = [d for t, d in history if 70 <= t < 60 + policy.stable_window]
    assert holding
    assert all(d.panicking and d.replicas == peak for d in holding)
    assert history[-1][1].replicas == 1
    assert peak_time < 70


def test_latency_p99_scales_in_proportion() -> None:
    policy = Policy(metric="latencyP99", target=100, min_replicas=1, max_replicas=16)
    # p99 300 ms at 2 replicas is 3x the target: 6 replicas wanted, panic, capped at 2x per decision.
    burst = decide(policy, [Sample(0, 300, 2)], now=0, current=2, ready=2, state=State())
    assert (burst.replicas, burst.panicking) == (4, True)
    # p99 150 ms at 2 replicas: 3 replicas, without panic.
    series = [Sample(t, 150, 2) for t in range(0, 12, 2)]
    mild = decide(policy, series, now=10, current=2, ready=2, state=State())
    assert (mild.replicas, mild.panicking, mild.reason) == (3, False, "ScaleUp")


def test_no_samples_holds_the_count_within_bounds() -> None:
    policy = Policy(min_replicas=2, max_replicas=4)
    decision = decide(policy, [], now=10.0, current=3, ready=3, state=State())
    assert (decision.replicas, decision.reason) == (3, "NoMetrics")
    assert "no concurrency samples" in decision.describe(policy, 3)
    assert decide(policy, [], now=10.0, current=9, ready=9, state=State()).replicas == 4


def test_describe_gives_the_numbers() -> None:
    history = simulate(POLICY, step(20, 80, at=10), seconds=14, start_replicas=2)
    scale_up = next(d for _, d in history if d.reason == "PanicScaleUp")
    text = scale_up.describe(POLICY, 2)
    assert text.startswith("PanicScaleUp: concurrency")
    assert "target 10 per replica; panic mode; 2 -> 4 replicas" in text
