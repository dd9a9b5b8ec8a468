"""Where `tandem cost` reads its histories: Prometheus, else the resources' status.

Prometheus has the real history: the operator's `tandem_cost_usd_total` counters by model and phase, and
the replicas' request and token counters, joined to their model through the operator's series of the
same service (`service` is the InferenceService's name on the replicas' series, as a ServiceMonitor
labels them). The status has the spend now and the rate now: a history of one line.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiohttp

from tandem.api.common import GROUP, VERSION
from tandem.errors import UserError
from tandem.operator.autoscaler_metrics import INFERENCE_ROUTES, REQUEST_DURATION, TOKENS
from tandem.operator.cost_report import Allocation, ModelHistory, Series
from tandem.operator.status_metrics import CONTAINERS, COST, HOURLY, STATUS_PHASE

#: The replicas' prompt-token counter (tandem.workloads.serve.metrics.PROMPT_TOKENS; the operator does not
#: import the workloads).
PROMPT_TOKENS = "tandem_serve_prompt_tokens_total"
QUERY_TIMEOUT_SECONDS = 10.0
QUERY_TIMEOUT = aiohttp.ClientTimeout(total=QUERY_TIMEOUT_SECONDS)
#: Points per plotted history (the range query's step is the span divided by this).
HISTORY_POINTS = 240


def _selector(namespace: str | None, *matchers: str, **labels: str) -> str:
    pairs = ([f'namespace="{namespace}"'] if namespace else []) + [f'{k}="{v}"' for k, v in labels.items()]
    return "{" + ",".join([*pairs, *matchers]) + "}"


def spend_query(namespace: str | None) -> str:
    """Cumulative dollars by model and phase."""
    return f"sum by (model, phase) ({COST}_total{_selector(namespace)})"


def training_active_query(namespace: str | None) -> str:
    """The models with a TrainingJob that has not ended: a phase other than Succeeded or Failed, or
    pods on nodes now. A model missing here has its training spend fixed."""
    not_ended = _selector(namespace, 'status_phase!~"Succeeded|Failed"', phase="training")
    on_nodes = f"{HOURLY}{_selector(namespace, phase='training')} > 0"
    return f"group by (model) ({STATUS_PHASE}{not_ended} or {on_nodes})"


def allocation_query(namespace: str | None) -> str:
    """Containers on nodes now by model and basis (usage or requests), both phases together."""
    return f"sum by (model, basis) ({CONTAINERS}{_selector(namespace)})"


def _allocation(usage: Series | None, requests: Series | None, end: float, step: float) -> Allocation | None:
    """A model's allocation at `end`: the last points of its two basis series (None: neither has a
    point within a step of `end`, its resources are gone)."""

    def now(series: Series | None) -> float | None:
        return series.last if series and series.points and series.points[-1][0] >= end - step else None

    measured, unmeasured = now(usage), now(requests)
    if measured is None and unmeasured is None:
        return None
    return Allocation(int((measured or 0) + (unmeasured or 0)), int(measured or 0))


def per_model_query(counters: str | tuple[str, ...], namespace: str | None, extra: str = "") -> str:
    """A replica counter summed by the model its InferenceService serves (joined on namespace and name);
    of several counters, each service's first one that exists."""
    matchers = ([f'namespace="{namespace}"'] if namespace else []) + ([extra] if extra else [])
    names = (counters,) if isinstance(counters, str) else counters
    replicas = " or ".join(f"sum by (namespace, service) ({c}{{{','.join(matchers)}}})" for c in names)
    services = f"group by (namespace, name, model) ({COST}_total{_selector(namespace, phase='serving')})"
    return (
        f'sum by (model) (label_replace({replicas}, "name", "$1", "service", "(.*)")'
        f" * on (namespace, name) group_left (model) {services})"
    )


def requests_query(namespace: str | None) -> str:
    return per_model_query(f"{REQUEST_DURATION}_count", namespace, f'route=~"{INFERENCE_ROUTES}"')


def tokens_query(namespace: str | None) -> str:
    """Generated tokens where a service generates, else the tokens it reads (an embeddings service)."""
    return per_model_query((TOKENS, PROMPT_TOKENS), namespace)


async def _get(base_url: str, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
    """The result of one Prometheus HTTP API query (through the operator's one HTTP client,
    `kubehttp`). Raises ConnectionError when Prometheus fails."""
    from tandem.operator import kubehttp

    url = f"{base_url.rstrip('/')}{path}?" + urllib.parse.urlencode(params)
    try:
        async with kubehttp.session().get(url, timeout=QUERY_TIMEOUT) as response:
            response.raise_for_status()
            reply = json.loads(await response.read())
    except (OSError, ValueError, TimeoutError, aiohttp.ClientError) as error:
        reason = str(error) or type(error).__name__
        raise ConnectionError(f"Prometheus at {base_url} did not answer ({reason})") from error
    if reply.get("status") != "success":
        raise ConnectionError(f"Prometheus at {base_url} refused a query: {reply.get('error')}")
    return list(reply["data"]["result"])


async def instant_query(base_url: str, query: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query's result vector (at `at`, else Prometheus' now); ConnectionError if it fails."""
    params = {"query": query} | ({"time": f"{at:.3f}"} if at is not None else {})
    return await _get(base_url, "/api/v1/query", params)


async def _range(base_url: str, query: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"}
    return await _get(base_url, "/api/v1/query_range", params)


def _series(result: Mapping[str, Any]) -> Series:
    return Series(tuple((float(t), float(v)) for t, v in result["values"]))


def _merged(coarse: Series, fine: Series) -> Series:
    """The coarse history up to where the fine one starts, then the fine one."""
    start = fine.points[0][0] if fine.points else float("inf")
    return Series(tuple(p for p in coarse.points if p[0] < start) + fine.points)


async def _histories(
    base_url: str, namespace: str | None, start: float, end: float, step: float
) -> dict[str, dict[str, Series]]:
    found: dict[str, dict[str, Series]] = defaultdict(dict)
    spend, requests, tokens, allocation = await asyncio.gather(
        *(
            _range(base_url, query, start, end, step)
            for query in (
                spend_query(namespace),
                requests_query(namespace),
                tokens_query(namespace),
                allocation_query(namespace),
            )
        )
    )
    for result in spend:
        labels = result["metric"]
        found[labels.get("phase", "")][labels.get("model", "")] = _series(result)
    for name, results in (("requests", requests), ("tokens", tokens)):
        for result in results:
            found[name][result["metric"].get("model", "")] = _series(result)
    for result in allocation:
        labels = result["metric"]
        found[f"allocation-{labels.get('basis', '')}"][labels.get("model", "")] = _series(result)
    return found


async def from_prometheus(
    base_url: str, namespace: str | None, now: datetime, span: float, window: float
) -> list[ModelHistory]:
    """Every model's history over the last `span` seconds: coarse (HISTORY_POINTS points) before the
    last `window`, fine (HISTORY_POINTS points) within it, where the rates are measured. Raises
    ConnectionError if Prometheus fails."""
    end = now.timestamp()
    window = min(window, span)
    fine_step = max(window / HISTORY_POINTS, 1.0)
    fine = await _histories(base_url, namespace, end - window, end, fine_step)
    coarse: dict[str, dict[str, Series]] = defaultdict(dict)
    if span > window:
        coarse = await _histories(
            base_url, namespace, end - span, end - window, max(span / HISTORY_POINTS, 1.0)
        )

    def series(kind: str, model: str) -> Series:
        return _merged(coarse[kind].get(model, Series()), fine[kind].get(model, Series()))

    models = set(fine["training"]) | set(fine["serving"]) | set(coarse["training"]) | set(coarse["serving"])
    active = {
        r["metric"].get("model", "")
        for r in await instant_query(base_url, training_active_query(namespace), end)
    }
    return [
        ModelHistory(
            model=model,
            training_usd=series("training", model),
            serving_usd=series("serving", model),
            requests=series("requests", model),
            tokens=series("tokens", model),
            training_ended=model not in active,
            allocation=_allocation(
                fine["allocation-usage"].get(model), fine["allocation-requests"].get(model), end, fine_step
            ),
        )
        for model in sorted(models)
    ]


async def _items(plural: str, namespace: str | None) -> list[dict[str, Any]]:
    from tandem.operator import kube

    try:
        reply = await kube.request("GET", kube.api_path(f"{GROUP}/{VERSION}", plural, namespace))
    except Exception as error:  # the client's ApiException, a connection error, a missing kubeconfig
        raise UserError(
            f"cannot list {plural} through the kubeconfig ({error}); "
            "pass --prometheus-url, or point KUBECONFIG at the cluster"
        ) from error
    return list(json.loads(reply).get("items") or [])


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None


async def from_status(namespace: str | None, now: datetime) -> list[ModelHistory]:
    """Every model's spend now and rate now, from the TrainingJobs' and InferenceServices' status.

    A TrainingJob's status has no rate: a running job is taken to go on at its average since it started.
    A model whose TrainingJobs have all Succeeded or Failed has its training spend fixed."""
    at = now.timestamp()
    bases: dict[str, set[str]] = defaultdict(set)
    training: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    active: set[str] = set()
    jobs, services = await asyncio.gather(
        _items("trainingjobs", namespace), _items("inferenceservices", namespace)
    )
    for job in jobs:
        status = job.get("status") or {}
        usd = float((status.get("cost") or {}).get("usd") or 0.0)
        per_second = 0.0
        started = _time(status.get("startTime"))
        if status.get("phase") == "Running" and started is not None and now > started:
            per_second = usd / (now - started).total_seconds()
        if status.get("phase") not in ("Succeeded", "Failed"):
            active.add(job["metadata"]["name"])
        if basis := (status.get("cost") or {}).get("allocation"):
            bases[job["metadata"]["name"]].add(basis)
        spent, rate = training[job["metadata"]["name"]]
        training[job["metadata"]["name"]] = (spent + usd, rate + per_second)
    serving: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for service in services:
        spec, status = service.get("spec") or {}, service.get("status") or {}
        ref = (spec.get("model") or {}).get("trainingJobRef") or {}
        model = (status.get("model") or {}).get("trainingJob") or ref.get("name") or ""
        paid, metrics = status.get("cost") or {}, status.get("metrics") or {}
        if basis := paid.get("allocation"):
            bases[model].add(basis)
        row = serving[model]
        row[0] += float(paid.get("usd") or 0.0)
        row[1] += float(paid.get("hourlyUSD") or 0.0) / 3600
        row[2] += float(metrics.get("rps") or 0.0)
        row[3] += float(metrics.get("tokensPerSecond") or 0.0)
    histories = []
    for model in sorted(set(training) | set(serving)):
        usd, per_second = training.get(model, (0.0, 0.0))
        served = serving.get(model, [0.0, 0.0, 0.0, 0.0])
        histories.append(
            ModelHistory(
                model=model,
                training_usd=Series.line(at, usd, per_second),
                serving_usd=Series.line(at, served[0], served[1]),
                requests=Series.line(at, served[2] * 3600, served[2], span=3600),
                tokens=Series.line(at, served[3] * 3600, served[3], span=3600),
                training_ended=model not in active,
                allocation_basis=_combined(bases.get(model, set())),
            )
        )
    return histories


def _combined(bases: set[str]) -> str | None:
    """One model's basis from its resources' (`usage`, `requests`, `mixed`): the same, else `mixed`."""
    if not bases:
        return None
    return next(iter(bases)) if len(bases) == 1 else "mixed"
