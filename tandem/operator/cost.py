"""One cost model for training and serving, allocated the way OpenCost allocates.

A container is charged for max(request, usage) of each resource (vCPU, memory, GPUs) times that
resource's hourly price, for the time it is on a node: a pod counts from the moment it is bound to a node
(it reserves the node's resources even while its image is pulled) until it finishes or goes. A pod the
scheduler has not placed costs nothing: an InferenceService asking for 100 x 8 GPUs with none scheduled
costs $0/h. GPUs are priced by product (the node's `nvidia.com/gpu.product` label, else the product the
spec asks for), falling back to a default price.

Usage is measured where it can be (tandem.operator.cost_usage reads the kubelet's cAdvisor series from
Prometheus): vCPUs and memory above the request are charged as used, below it the request is charged
(it is reserved). GPUs are always charged by the request: the device plugin hands out whole GPUs, so a
container never uses more than it asked for, and one it leaves idle is still reserved; DCGM utilisation,
where an exporter runs, only says how much of that was busy. A container without usage (a kwok node, no
kubelet scrape, Prometheus down) is charged its requests, as OpenCost does when usage is missing, and the
`Rate` counts how many containers were measured so the status and `tandem cost` can say which it was.

Pure functions only: the reconcilers call them, the status and the Prometheus counters carry the result.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tandem.api.common import CostAllocation
from tandem.operator.gpu import GPU_RESOURCE

#: OpenCost's published default prices (github.com/opencost/opencost configs/default.json, "Default
#: prices based on GCP us-central1", what it uses when no pricing source is configured), read 2026-12-05.
OPENCOST_CPU_USD_PER_VCPU_HOUR = 0.031611
OPENCOST_RAM_USD_PER_GIB_HOUR = 0.004237
OPENCOST_GPU_USD_PER_GPU_HOUR = 0.95
#: OpenCost divides memory bytes by 1024^3 before applying its RAM price ("GB" there is a GiB).
GIB = 1024**3
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Prices:
    """Hourly prices: GPU by product (with a default for the rest), vCPU and GiB of memory."""

    gpu_by_product: Mapping[str, float]
    gpu_default: float = OPENCOST_GPU_USD_PER_GPU_HOUR
    cpu_per_vcpu_hour: float = OPENCOST_CPU_USD_PER_VCPU_HOUR
    ram_per_gib_hour: float = OPENCOST_RAM_USD_PER_GIB_HOUR

    def gpu(self, product: str | None) -> float:
        """USD per GPU-hour of `product`; the default price for an unknown or missing product."""
        if product and product in self.gpu_by_product:
            return self.gpu_by_product[product]
        return self.gpu_default


@dataclass(frozen=True)
class Amounts:
    """Amounts of the priced resources: vCPUs, memory bytes, whole GPUs."""

    cpu: float = 0.0
    memory_bytes: float = 0.0
    gpus: int = 0

    def at_least(self, other: Amounts | None) -> Amounts:
        """Per resource, the larger of the two (OpenCost's max(request, usage))."""
        if other is None:
            return self
        return Amounts(
            max(self.cpu, other.cpu), max(self.memory_bytes, other.memory_bytes), max(self.gpus, other.gpus)
        )


@dataclass(frozen=True)
class Usage:
    """One container's measured usage: average vCPUs and memory bytes over the usage window, and, where
    DCGM reports it, the busy fraction of its GPUs (0..1). None: not measured."""

    cpu: float | None = None
    memory_bytes: float | None = None
    gpu_busy: float | None = None

    @property
    def measured(self) -> bool:
        """Whether vCPUs or memory were measured (what moves the allocation; one missing counts as 0,
        so its request is charged)."""
        return self.cpu is not None or self.memory_bytes is not None


#: Measured usage of one pod's containers, by container name.
PodUsage = Mapping[str, Usage]


@dataclass(frozen=True)
class Container:
    """One container's requests and, when known, its measured usage."""

    request: Amounts
    usage: Amounts | None = None
    #: The container's name in its pod (the `container` label of its usage series).
    name: str = ""
    #: The busy fraction of its GPUs (DCGM), where measured: reported, never charged differently.
    gpu_busy: float | None = None

    @property
    def allocated(self) -> Amounts:
        """max(request, usage) for vCPUs and memory; the requested GPUs (reserved whole)."""
        allocated = self.request.at_least(self.usage)
        return Amounts(allocated.cpu, allocated.memory_bytes, self.request.gpus)


@dataclass(frozen=True)
class Rate:
    """What something costs per hour while it runs, the GPUs it holds, and how it was allocated:
    `containers` priced, `measured` of them with usage (the rest by their requests)."""

    usd_per_hour: float = 0.0
    gpus: int = 0
    containers: int = 0
    measured: int = 0
    #: GPUs' hourly price times their idle fraction, over the containers with DCGM utilisation.
    idle_gpu_usd_per_hour: float = 0.0
    #: Containers holding GPUs whose utilisation DCGM reported.
    gpu_measured: int = 0

    def __add__(self, other: Rate) -> Rate:
        return Rate(
            self.usd_per_hour + other.usd_per_hour,
            self.gpus + other.gpus,
            self.containers + other.containers,
            self.measured + other.measured,
            self.idle_gpu_usd_per_hour + other.idle_gpu_usd_per_hour,
            self.gpu_measured + other.gpu_measured,
        )

    @property
    def basis(self) -> str:
        """`usage` (every container measured), `requests` (none), `mixed`, or `none` (nothing priced)."""
        if not self.containers:
            return "none"
        if self.measured == self.containers:
            return "usage"
        return "requests" if not self.measured else "mixed"


def allocation(rate: Rate) -> CostAllocation | None:
    """The status's `cost.allocation` for what `rate` prices (None while nothing is on a node)."""
    return None if rate.basis == "none" else CostAllocation(rate.basis)


@dataclass(frozen=True)
class Spend:
    """Money and GPU time accumulated so far."""

    usd: float = 0.0
    gpu_seconds: float = 0.0

    def plus(self, rate: Rate, seconds: float) -> Spend:
        """This spend after `rate` ran for `seconds` (negative time, from a clock step back, adds nothing)."""
        seconds = max(seconds, 0.0)
        return Spend(
            self.usd + rate.usd_per_hour * seconds / SECONDS_PER_HOUR, self.gpu_seconds + rate.gpus * seconds
        )


@functools.lru_cache(maxsize=256)
def _quantity(text: str) -> float:
    """Parsed by the Kubernetes client's own parser (imported here: it loads the whole client)."""
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(text))  # type: ignore[no-untyped-call]


def _amount(value: Any) -> float:
    """A quantity as a number; cached, because every pod event of the watches passes here."""
    return _quantity(str(value)) if value not in (None, "") else 0.0


def containers_of(pod: Mapping[str, Any]) -> tuple[Container, ...]:
    """The priced requests of a pod's containers, from its manifest (requests, else limits, which is
    what Kubernetes requests when only limits are set). Init containers are left out: they run before
    the others and hold their resources only briefly."""
    containers = []
    for container in (pod.get("spec") or {}).get("containers") or ():
        resources = container.get("resources") or {}
        asked = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        containers.append(
            Container(
                Amounts(
                    cpu=_amount(asked.get("cpu")),
                    memory_bytes=_amount(asked.get("memory")),
                    gpus=int(_amount(asked.get(GPU_RESOURCE))),
                ),
                name=str(container.get("name") or ""),
            )
        )
    return tuple(containers)


def with_usage(containers: Iterable[Container], usage: PodUsage | None) -> tuple[Container, ...]:
    """The containers with their measured usage filled in, by name; one not measured (or all, when
    `usage` is None) keeps its requests alone."""
    measured = []
    for container in containers:
        found = (usage or {}).get(container.name)
        if found is None:
            measured.append(container)
            continue
        amounts = (
            Amounts(cpu=found.cpu or 0.0, memory_bytes=found.memory_bytes or 0.0) if found.measured else None
        )
        measured.append(Container(container.request, amounts, container.name, found.gpu_busy))
    return tuple(measured)


def on_node(phase: str | None, node: str | None) -> bool:
    """Whether a pod holds a node's resources: bound to one and not finished."""
    return node is not None and phase not in ("Succeeded", "Failed")


def pod_rate(
    containers: Iterable[Container], gpu_product: str | None, prices: Prices, usage: PodUsage | None = None
) -> Rate:
    """Hourly cost of one pod on a node: each container's allocation (max(request, usage), with
    `usage` filled in by container name when given) priced resource by resource."""
    total = Rate()
    for container in with_usage(containers, usage) if usage is not None else containers:
        allocated = container.allocated
        gpu_price = prices.gpu(gpu_product)
        busy = container.gpu_busy
        total += Rate(
            allocated.gpus * gpu_price
            + allocated.cpu * prices.cpu_per_vcpu_hour
            + allocated.memory_bytes / GIB * prices.ram_per_gib_hour,
            allocated.gpus,
            containers=1,
            measured=int(container.usage is not None),
            idle_gpu_usd_per_hour=0.0
            if busy is None
            else allocated.gpus * gpu_price * (1.0 - min(max(busy, 0.0), 1.0)),
            gpu_measured=int(busy is not None and allocated.gpus > 0),
        )
    return total


def per_million(usd_per_hour: float, per_second: float | None) -> float | None:
    """Dollars per million units (requests, tokens) at `per_second` units per second; None without load."""
    if not per_second or per_second <= 0:
        return None
    return usd_per_hour / (per_second * SECONDS_PER_HOUR) * 1_000_000
