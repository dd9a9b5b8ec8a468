"""The cost model: OpenCost's allocation, its default prices, and one price table for chart and operator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.operator import cost
from tandem.operator.config import DEFAULT_GPU_PRICES_USD_PER_HOUR, OperatorSettings

REPO = Path(__file__).resolve().parents[2]
PRICES = cost.Prices({"NVIDIA-H100-80GB-HBM3": 4.0})


def pod(
    *containers: dict[str, dict[str, str]], phase: str = "Running", node: str | None = "n1"
) -> dict[str, Any]:
    return {
        "spec": {
            "nodeName": node,
            "containers": [{"name": f"c{i}", "resources": r} for i, r in enumerate(containers)],
        },
        "status": {"phase": phase},
    }


def test_a_container_pays_for_the_larger_of_request_and_usage() -> None:
    request = cost.Amounts(cpu=2, memory_bytes=4 * cost.GIB, gpus=1)
    usage = cost.Amounts(cpu=3.5, memory_bytes=1 * cost.GIB, gpus=0)
    rate = cost.pod_rate([cost.Container(request, usage)], "NVIDIA-H100-80GB-HBM3", PRICES)
    assert rate.gpus == 1
    assert rate.usd_per_hour == pytest.approx(4.0 + 3.5 * 0.031611 + 4 * 0.004237)


def test_opencost_defaults_price_what_the_table_does_not_know() -> None:
    rate = cost.pod_rate(
        [cost.Container(cost.Amounts(cpu=1, memory_bytes=cost.GIB, gpus=2))], "GB200", PRICES
    )
    assert rate.usd_per_hour == pytest.approx(2 * 0.95 + 0.031611 + 0.004237)
    assert cost.Prices({}).gpu(None) == 0.95


def test_requests_are_read_from_the_pod_and_limits_stand_in_for_missing_requests() -> None:
    manifest = pod(
        {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"nvidia.com/gpu": "4", "cpu": "8"}},
        {"limits": {"cpu": "1", "memory": "512Mi"}},
    )
    containers = cost.containers_of(manifest)
    assert [c.request for c in containers] == [
        cost.Amounts(cpu=0.5, memory_bytes=2 * cost.GIB, gpus=4),
        cost.Amounts(cpu=1.0, memory_bytes=cost.GIB / 2, gpus=0),
    ]


def test_only_pods_on_a_node_cost_anything() -> None:
    assert cost.on_node("Pending", "n1")  # bound, image still pulling: the node's resources are reserved
    assert cost.on_node("Running", "n1")
    assert not cost.on_node("Pending", None)  # unscheduled: nothing reserved, nothing charged
    assert not cost.on_node("Succeeded", "n1")
    assert not cost.on_node("Failed", "n1")


def test_spend_accrues_rate_times_time_and_ignores_a_clock_going_back() -> None:
    spend = cost.Spend().plus(cost.Rate(usd_per_hour=32.0, gpus=8), 1800)
    assert spend == cost.Spend(usd=16.0, gpu_seconds=8 * 1800)
    assert spend.plus(cost.Rate(32.0, 8), -60) == spend


def test_per_million_needs_load() -> None:
    assert cost.per_million(8.0, 100.0) == pytest.approx(8 / 360_000 * 1e6)
    assert cost.per_million(8.0, 0.0) is None
    assert cost.per_million(8.0, None) is None


def test_settings_default_to_opencost_prices_and_the_chart_repeats_the_table() -> None:
    """One price table: the chart's values are the operator's defaults, price for price."""
    settings = OperatorSettings()
    assert settings.cpu_price_usd_per_vcpu_hour == 0.031611
    assert settings.memory_price_usd_per_gib_hour == 0.004237
    assert settings.default_gpu_price_usd_per_hour == 0.95
    values = yaml.safe_load((REPO / "charts/tandem/values.yaml").read_text())["config"]
    assert values["gpuPricesUsdPerHour"] == DEFAULT_GPU_PRICES_USD_PER_HOUR
    assert values["defaultGpuPriceUsdPerHour"] == settings.default_gpu_price_usd_per_hour
    assert values["cpuPriceUsdPerVcpuHour"] == settings.cpu_price_usd_per_vcpu_hour
    assert values["memoryPriceUsdPerGibHour"] == settings.memory_price_usd_per_gib_hour
    prices = settings.prices()
    assert prices.gpu("NVIDIA-H100-80GB-HBM3") == values["gpuPricesUsdPerHour"]["NVIDIA-H100-80GB-HBM3"]
