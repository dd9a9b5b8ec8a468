"""Allocation from observed usage: max(request, usage) per container, requests where usage is missing.

The numbers are worked by hand from OpenCost's default prices ($0.031611 per vCPU-hour, $0.004237 per
GiB-hour, $0.95 per GPU-hour) and a $4 H100."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from tandem.operator import cost, cost_usage, kubehttp

PRICES = cost.Prices({"H100": 4.0})
CPU, RAM = cost.OPENCOST_CPU_USD_PER_VCPU_HOUR, cost.OPENCOST_RAM_USD_PER_GIB_HOUR


T = TypeVar("T")


def coroutine_of(function: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """A plain function as the coroutine function it stands in for."""

    async def call(*args: Any) -> T:
        return function(*args)

    return call


def manifest() -> dict[str, Any]:
    """A pod with a server asking 2 vCPUs, 4 GiB and 1 GPU, and a sidecar asking 0.5 vCPU, 1 GiB."""
    return {
        "spec": {
            "nodeName": "n1",
            "containers": [
                {
                    "name": "server",
                    "resources": {
                        "requests": {"cpu": "2", "memory": "4Gi"},
                        "limits": {"nvidia.com/gpu": "1"},
                    },
                },
                {"name": "sidecar", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
            ],
        }
    }


REQUESTED = 4.0 + 2 * CPU + 4 * RAM + 0.5 * CPU + 1 * RAM


def test_requests_alone_when_no_usage_was_measured() -> None:
    containers = cost.containers_of(manifest())
    assert [c.name for c in containers] == ["server", "sidecar"]
    for usage in (None, {}, {"other": cost.Usage(cpu=9.0, memory_bytes=9e9)}):
        rate = cost.pod_rate(containers, "H100", PRICES, usage)
        assert rate.usd_per_hour == pytest.approx(REQUESTED)
        assert (rate.containers, rate.measured, rate.basis) == (2, 0, "requests")


def test_usage_above_the_request_is_charged_as_used() -> None:
    usage = {"server": cost.Usage(cpu=3.5, memory_bytes=6 * cost.GIB)}
    rate = cost.pod_rate(cost.containers_of(manifest()), "H100", PRICES, usage)
    assert rate.usd_per_hour == pytest.approx(4.0 + 3.5 * CPU + 6 * RAM + 0.5 * CPU + 1 * RAM)
    assert (rate.gpus, rate.measured, rate.basis) == (1, 1, "mixed")


def test_usage_below_the_request_still_pays_the_reservation() -> None:
    usage = {
        "server": cost.Usage(cpu=0.1, memory_bytes=0.5 * cost.GIB),
        "sidecar": cost.Usage(cpu=0.01, memory_bytes=0.1 * cost.GIB),
    }
    rate = cost.pod_rate(cost.containers_of(manifest()), "H100", PRICES, usage)
    assert rate.usd_per_hour == pytest.approx(REQUESTED)
    assert rate.basis == "usage"


def test_each_resource_takes_its_own_maximum() -> None:
    """CPU above the request and memory below it: CPU as used, memory as requested."""
    usage = {"sidecar": cost.Usage(cpu=2.0, memory_bytes=0.2 * cost.GIB)}
    rate = cost.pod_rate(cost.containers_of(manifest()), "H100", PRICES, usage)
    assert rate.usd_per_hour == pytest.approx(4.0 + 2 * CPU + 4 * RAM + 2.0 * CPU + 1 * RAM)


def test_one_quantity_missing_charges_its_request() -> None:
    usage = {"sidecar": cost.Usage(cpu=None, memory_bytes=3 * cost.GIB)}
    rate = cost.pod_rate(cost.containers_of(manifest()), "H100", PRICES, usage)
    assert rate.usd_per_hour == pytest.approx(4.0 + 2 * CPU + 4 * RAM + 0.5 * CPU + 3 * RAM)
    assert rate.measured == 1


def test_gpus_are_charged_whole_and_dcgm_utilisation_only_says_how_much_idled() -> None:
    usage = {"server": cost.Usage(cpu=2.0, memory_bytes=4 * cost.GIB, gpu_busy=0.25)}
    rate = cost.pod_rate(cost.containers_of(manifest()), "H100", PRICES, usage)
    assert rate.usd_per_hour == pytest.approx(REQUESTED)
    assert rate.gpus == 1
    assert rate.idle_gpu_usd_per_hour == pytest.approx(0.75 * 4.0)
    without_dcgm = cost.pod_rate(cost.containers_of(manifest()), "H100", PRICES, {})
    assert without_dcgm.idle_gpu_usd_per_hour == 0.0


def test_rates_add_up_their_allocation_basis() -> None:
    measured = cost.Rate(1.0, 1, containers=2, measured=2)
    requested = cost.Rate(2.0, 0, containers=1, measured=0)
    assert (measured + requested).basis == "mixed"
    assert (measured + requested).containers == 3
    assert cost.Rate().basis == "none"


def vector(*samples: tuple[str, str, str, float]) -> list[dict[str, Any]]:
    return [
        {"metric": {"namespace": ns, "pod": pod, "container": c}, "value": [0, str(v)]}
        for ns, pod, c, v in samples
    ]


def test_a_snapshot_reads_cpu_memory_and_gpu_by_container() -> None:
    replies = {
        "cpu": vector(("ml", "p-0", "server", 3.5), ("ml", "p-0", "sidecar", 0.01)),
        "memory_bytes": vector(("ml", "p-0", "server", 6 * cost.GIB), ("ml", "p-1", "server", float("nan"))),
        "gpu_busy": vector(("ml", "p-0", "server", 0.4)),
    }
    seen: list[str] = []

    async def query(expression: str, what: str) -> list[dict[str, Any]]:
        seen.append(expression)
        return replies[what]

    snapshot = asyncio.run(cost_usage.read(query, window="2m", now=100.0))
    assert snapshot.problem is None
    assert snapshot.for_pod("ml", "p-0") == {
        "server": cost.Usage(cpu=3.5, memory_bytes=6 * cost.GIB, gpu_busy=0.4),
        "sidecar": cost.Usage(cpu=0.01),
    }
    assert snapshot.for_pod("ml", "p-1") is None  # NaN only: not measured
    assert all("[2m]" in e for e in seen)
    assert 'container!="POD"' in seen[0]


def test_no_series_or_no_prometheus_falls_back_to_requests_and_says_why() -> None:
    empty = asyncio.run(cost_usage.read(coroutine_of(lambda expression, what: [])))
    assert empty.problem == cost_usage.NO_SERIES
    assert "kwok" in empty.problem
    assert "requests only" in empty.problem

    async def down(expression: str, what: str) -> list[dict[str, Any]]:
        raise ConnectionError("Prometheus at http://prom:9090 did not answer (refused)")

    failed = asyncio.run(cost_usage.read(down))
    assert failed.problem is not None
    assert "did not answer" in failed.problem
    assert failed.pods == {}
    assert cost_usage.UsageSource("").snapshot().problem == cost_usage.NO_PROMETHEUS


def test_a_real_unreachable_prometheus_is_a_problem_not_an_exception() -> None:
    async def scenario() -> cost_usage.UsageSnapshot:
        source = cost_usage.UsageSource("http://127.0.0.1:9", refresh_seconds=60)
        try:
            return await source.wait(30)
        finally:
            await source.close()

    snapshot = kubehttp.run(scenario())
    assert snapshot.problem is not None
    assert "did not answer" in snapshot.problem


def test_the_source_refreshes_in_the_background_at_most_once_per_interval() -> None:
    now = [0.0]
    calls: list[str] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def query(expression: str, what: str) -> list[dict[str, Any]]:
            await release.wait()
            calls.append(what)
            return vector(("ml", "p-0", "server", 1.0)) if what == "cpu" else []

        source = cost_usage.UsageSource("", refresh_seconds=30, query=query, clock=lambda: now[0])
        try:
            assert source.snapshot().for_pod("ml", "p-0") is None  # not landed yet: never waits
            await asyncio.sleep(0)  # the round has started and waits on Prometheus
            assert source.snapshot().for_pod("ml", "p-0") is None
            release.set()
            assert (await source.wait(30)).for_pod("ml", "p-0") == {"server": cost.Usage(cpu=1.0)}
            assert source.snapshot().for_pod("ml", "p-0") is not None
            assert len(calls) == 3  # one round, not one per snapshot()
            now[0] = 31.0
            await source.wait(30)
            assert len(calls) == 6
        finally:
            await source.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_the_queries_keep_to_the_watched_namespaces() -> None:
    everywhere = cost_usage.queries("5m")
    assert all("namespace=~" not in q for q in everywhere.values())
    watched = cost_usage.queries("5m", ["ml", "team-a"])
    assert all('namespace=~"ml|team-a"' in q for q in watched.values())


def test_snapshots_taken_often_start_one_round_at_a_time_and_never_wait() -> None:
    """A reconcile asks for a snapshot on every pass: it is handed the last one at once, and at most
    one query round runs at a time however often it asks."""
    rounds: list[int] = []

    async def query(expression: str, what: str) -> list[dict[str, Any]]:
        rounds.append(1)
        await asyncio.sleep(0.01)
        return vector(("ml", "p-0", "server", 1.0))

    async def scenario() -> None:
        source = cost_usage.UsageSource("", refresh_seconds=0, query=query)
        try:
            for _ in range(300):
                source.snapshot()  # no await: it never waits for Prometheus
            assert len(rounds) <= 3  # one round in flight: its three queries
            assert (await source.wait(30)).for_pod("ml", "p-0") == {"server": cost.Usage(1.0, 1.0, 1.0)}
        finally:
            await source.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_malformed_reply_is_a_problem_not_a_failed_reconcile(caplog: pytest.LogCaptureFixture) -> None:
    async def no_value(expression: str, what: str) -> list[dict[str, Any]]:
        return [{"metric": {"namespace": "ml", "pod": "p", "container": "c"}}]

    async def scenario() -> cost_usage.UsageSnapshot:
        source = cost_usage.UsageSource("", query=no_value)
        try:
            return await source.wait(30)
        finally:
            await source.close()

    snapshot = asyncio.run(scenario())
    assert snapshot.problem is not None
    assert snapshot.problem.startswith("reading usage failed")
    assert snapshot.problem.endswith("requests only")
    assert "reading container usage from Prometheus failed" in caplog.text
