"""The operator's one settings object: every knob, its default and its meaning in one place.

Values come from a YAML file (the Helm chart mounts its `config:` values as a ConfigMap, key for key)
and can be overridden by environment variables `TANDEM_<FIELD_IN_UPPER_SNAKE_CASE>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tandem.errors import UserError
from tandem.operator import cost

CONFIG_FILE_ENV = "TANDEM_CONFIG_FILE"
ENV_PREFIX = "TANDEM_"

#: USD per GPU-hour by `nvidia.com/gpu.product`. The chart's `config.gpuPricesUsdPerHour` repeats this table
#: value for value (tests/unit/test_operator_config.py holds them equal); change both together.
#: Sources, read 2026-12-05: the hyperscaler on-demand ranges of mercatus-ai.com/blog/cloud-gpu-pricing
#: (May 2026: H100 SXM5 $3.50-5.00, H200 $4.50-7.00, A100 80GB $1.50-3.00) and RunPod's L4
#: on-demand rate quoted by deploybase.ai/articles/nvidia-l4-price ($0.44).
DEFAULT_GPU_PRICES_USD_PER_HOUR: dict[str, float] = {
    "NVIDIA-H100-80GB-HBM3": 4.00,
    "NVIDIA-H200": 5.00,
    "NVIDIA-A100-SXM4-80GB": 2.50,
    "NVIDIA-L4": 0.44,
}


#: The values of `gangScheduler`: no gang engine, or scheduler-plugins' coscheduling (PodGroup).
GANG_SCHEDULERS = ("none", "coscheduling")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class OperatorSettings:
    """Operator configuration. Field names map one to one onto the chart's `config:` values (camelCase)."""

    training_image: str = field(
        default="ghcr.io/tandem-dev/tandem-workloads:0.1.0",
        metadata=_doc("Image for TrainingJob head and worker pods when spec.image is not set."),
    )
    serving_image: str = field(
        default="ghcr.io/tandem-dev/tandem-workloads:0.1.0",
        metadata=_doc("Image for InferenceService replicas."),
    )
    namespaces: tuple[str, ...] = field(
        default=(),
        metadata=_doc("Namespaces to watch; empty watches the whole cluster."),
    )
    gpu_prices_usd_per_hour: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_GPU_PRICES_USD_PER_HOUR),
        metadata=_doc("Price of one GPU-hour by GPU product label (nvidia.com/gpu.product)."),
    )
    default_gpu_price_usd_per_hour: float = field(
        default=cost.OPENCOST_GPU_USD_PER_GPU_HOUR,
        metadata=_doc("Price of one GPU-hour for products missing from the table (OpenCost's default)."),
    )
    cpu_price_usd_per_vcpu_hour: float = field(
        default=cost.OPENCOST_CPU_USD_PER_VCPU_HOUR,
        metadata=_doc("Price of one vCPU-hour of a container's request (OpenCost's default)."),
    )
    memory_price_usd_per_gib_hour: float = field(
        default=cost.OPENCOST_RAM_USD_PER_GIB_HOUR,
        metadata=_doc("Price of one GiB-hour of a container's memory request (OpenCost's default)."),
    )
    prometheus_url: str = field(
        default="",
        metadata=_doc("Prometheus HTTP API the autoscaler queries; empty scrapes replicas directly."),
    )
    metrics_port: int = field(default=8080, metadata=_doc("Port of the operator's Prometheus /metrics."))
    health_port: int = field(default=8081, metadata=_doc("Port of the operator's liveness /healthz."))
    autoscaler_tick_seconds: float = field(
        default=2.0, metadata=_doc("How often the builtin autoscaler evaluates each service.")
    )
    autoscaler_stable_window_seconds: int = field(
        default=60, metadata=_doc("Default stable window when a service does not set one.")
    )
    autoscaler_panic_window_seconds: int = field(
        default=6, metadata=_doc("Default panic window when a service does not set one.")
    )
    leader_election: bool = field(
        default=True,
        metadata=_doc(
            "Reconcile only while holding the leader Lease, so that several replicas can run (one leads,"
            " the others stand by with warm caches). False: reconcile at once; run one replica only."
        ),
    )
    leader_election_namespace: str = field(
        default="",
        metadata=_doc("Namespace of the leader Lease; empty: the operator pod's own namespace."),
    )
    leader_election_lease_name: str = field(
        default="tandem-operator", metadata=_doc("Name of the leader Lease (coordination.k8s.io).")
    )
    lease_duration_seconds: float = field(
        default=15.0,
        metadata=_doc(
            "How long a standby waits after the leader's last renewal before taking over (a standby"
            " takes over within this plus twice retryPeriodSeconds of the leader stopping)."
        ),
    )
    renew_deadline_seconds: float = field(
        default=10.0,
        metadata=_doc("A leader that could not renew for this long exits (less than leaseDurationSeconds)."),
    )
    retry_period_seconds: float = field(
        default=2.0, metadata=_doc("How often the leader renews, and a standby tries to take over.")
    )
    network_policy: bool = field(
        default=False,
        metadata=_doc(
            "Give every TrainingJob a NetworkPolicy: its pods accept connections (Ray's GCS, dashboard,"
            " object and worker ports) only from the job's own pods; the metrics port stays open (needs a"
            " CNI that enforces NetworkPolicies)."
        ),
    )
    gang_scheduler: str = field(
        default="none",
        metadata=_doc(
            "Who admits a TrainingJob's gang: `none` (the pods' scheduler, with the operator's gang"
            " timeout) or `coscheduling` (a PodGroup per attempt and the pods sent to gangSchedulerName,"
            " the coscheduling plugin of sigs.k8s.io/scheduler-plugins, which binds a gang whole or not)."
        ),
    )
    gang_scheduler_name: str = field(
        default="scheduler-plugins-scheduler",
        metadata=_doc(
            "schedulerName of the coscheduling scheduler's profile (the scheduler-plugins chart's"
            " default); used when gangScheduler is coscheduling and the spec names no scheduler."
        ),
    )

    def __post_init__(self) -> None:
        if self.gang_scheduler not in GANG_SCHEDULERS:
            raise UserError(
                f"operator config 'gangScheduler': {self.gang_scheduler!r} is not one of "
                f"{', '.join(GANG_SCHEDULERS)}"
            )

    def prices(self) -> cost.Prices:
        """The price table of the cost model (tandem.operator.cost)."""
        return cost.Prices(
            gpu_by_product=self.gpu_prices_usd_per_hour,
            gpu_default=self.default_gpu_price_usd_per_hour,
            cpu_per_vcpu_hour=self.cpu_price_usd_per_vcpu_hour,
            ram_per_gib_hour=self.memory_price_usd_per_gib_hour,
        )

    def gpu_price(self, product: str | None) -> float:
        """USD per GPU-hour for a product label, falling back to the default price."""
        return self.prices().gpu(product)


def camel_name(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _convert(name: str, raw: Any, target: Any, source: str) -> Any:
    """Convert one raw value (YAML value or env string) to the field's type, or say what is wrong."""
    try:
        if target in ("bool", bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).strip().lower() in ("true", "1", "yes"):
                return True
            if str(raw).strip().lower() in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if target in ("int", int):
            return int(raw)
        if target in ("float", float):
            return float(raw)
        if target in ("str", str):
            if not isinstance(raw, str):
                raise TypeError("expected a string")
            return raw
        if "tuple" in str(target):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(item.strip() for item in items if str(item).strip())
        if "Mapping" in str(target):
            table = json.loads(raw) if isinstance(raw, str) else dict(raw)
            return {str(key): float(value) for key, value in table.items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"operator config {name!r} from {source}: {raw!r} is invalid ({exc})") from exc
    raise AssertionError(f"unsupported settings type {target!r}")  # pragma: no cover - programming error


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Build settings from the config file named by TANDEM_CONFIG_FILE, then TANDEM_* env overrides."""
    env = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(OperatorSettings)}
    values: dict[str, Any] = {}
    config_file = env.get(CONFIG_FILE_ENV)
    if config_file:
        path = Path(config_file)
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read operator config {path}: {exc}") from exc
        if not isinstance(document, dict):
            raise UserError(f"operator config {path} must be a mapping of settings")
        by_camel = {camel_name(name): name for name in fields}
        for key, raw in document.items():
            if key not in by_camel:
                known = ", ".join(sorted(by_camel))
                raise UserError(f"operator config {path}: unknown setting {key!r}; known settings: {known}")
            name = by_camel[key]
            values[name] = _convert(key, raw, fields[name].type, str(path))
    for name, spec in fields.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in env:
            values[name] = _convert(env_name, env[env_name], spec.type, "the environment")
    return OperatorSettings(**values)


def describe_settings() -> list[tuple[str, str, str]]:
    """(chart value name, default, meaning) for every setting: used by docs and `--help`."""
    defaults = OperatorSettings()
    rows = []
    for spec in dataclasses.fields(OperatorSettings):
        rows.append((camel_name(spec.name), repr(getattr(defaults, spec.name)), spec.metadata["doc"]))
    return rows
