"""Start the operator: kopf with Tandem's storage settings, /metrics, a liveness endpoint, and the
leader election that decides when this replica's work queues start (see tandem.operator.leader).

One runtime: kopf's event loop runs everything. kopf's part is the handlers that feed the queues
(the node index and events), the startup and cleanup activities that start and stop the controllers,
the liveness probe, its own events and settings, and its login (its own aiohttp session, for its own
calls). Tandem's part, on the same loop: the label-selected watch caches, the work queues and their
coroutine reconciles, the leader Lease, the usage reader and the autoscalers, all through one aiohttp
session (`kubehttp`), opened on first use and closed at cleanup."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from tandem.operator.config import OperatorSettings

ANNOTATION_PREFIX = "tandem.dev"
#: kopf's threads for sync handlers: Tandem registers none (its handlers are coroutines), so few.
HANDLER_THREADS = 1
#: Connections kopf may hold open to the API server (watch streams included). kopf's own session has
#: no limit, so hundreds of concurrent status patches and events each open a TLS connection with its
#: own 128 KiB buffer: at 500 TrainingJobs that alone took over 200 MB.
API_CONNECTIONS = 32
log = logging.getLogger("tandem.operator")


def configure_kopf(kopf_settings: Any) -> None:
    """Keep kopf's bookkeeping in tandem.dev annotations (status is ours and schema-pruned)."""
    import kopf

    from tandem.operator.controller_common import KOPF_FINALIZER

    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = KOPF_FINALIZER
    # Only kopf's own warnings become Kubernetes events; Tandem posts its own events.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.watching.server_timeout = 300
    kopf_settings.networking.request_timeout = 60
    kopf_settings.execution.max_workers = HANDLER_THREADS


def limited_session(login_kwargs: dict[str, Any]) -> Any:
    """kopf's credentials (in-cluster or kubeconfig) on an aiohttp session with a connection limit."""
    import aiohttp
    import kopf

    info = kopf.login_via_client(**login_kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=API_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
    )
    return kopf.AiohttpSession(
        server=info.server, default_namespace=info.default_namespace, aiohttp_session=session
    )


def lease_settings(settings: OperatorSettings) -> Any:
    """The leader Lease's settings from the operator's (namespace: the setting, else the pod's)."""
    from tandem.operator.leader import LeaseSettings, default_identity, default_namespace

    return LeaseSettings(
        namespace=settings.leader_election_namespace or default_namespace(),
        name=settings.leader_election_lease_name,
        identity=default_identity(),
        lease_duration=settings.lease_duration_seconds,
        renew_deadline=settings.renew_deadline_seconds,
        retry_period=settings.retry_period_seconds,
    )


def _lost_leadership() -> None:
    """Exit at once, without kopf's cleanup: a replica that may no longer lead must not finish the
    reconciles it started (another replica may be leading already)."""
    logging.shutdown()
    os._exit(1)


def controller_health(memo: Any) -> list[Any]:
    """Each started controller's caches and queue, for /healthz."""
    from tandem.operator.health import ControllerHealth

    found = []
    trainingjobs = getattr(memo, "trainingjobs", None)
    if trainingjobs is not None:
        caches = (trainingjobs.pods, trainingjobs.job_cache)
        found.append(ControllerHealth("TrainingJob", caches, trainingjobs.queue))
    services = getattr(memo, "inferenceservices", None)
    if services is not None:
        caches = (*services.caches.all(), services.service_cache)
        found.append(ControllerHealth("InferenceService", caches, services.queue))
    return found


def run_operator(settings: OperatorSettings, verbose: bool = False) -> int:
    """Run until interrupted. Handlers are registered by importing their modules."""
    import kopf
    import uvloop
    from prometheus_client import start_http_server

    from tandem.operator.inferenceservice import controller as _inferenceservice_controller
    from tandem.operator.trainingjob import controller as _trainingjob_controller

    del _inferenceservice_controller, _trainingjob_controller
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # "Timer ... succeeded" for every object every tick drowns everything else
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    from tandem.operator.cost_usage import UsageSource
    from tandem.operator.leader import LeaderElector
    from tandem.operator.metrics import LEADER

    # asyncio.Event binds to the loop on first use: made here, awaited on kopf's loop.
    elector = (
        LeaderElector(lease_settings(settings), on_lost=_lost_leadership)
        if settings.leader_election
        else None
    )
    leading = elector.leading if elector is not None else asyncio.Event()
    # The containers' measured usage for the cost model, refreshed in the background.
    usage = UsageSource(settings.prometheus_url, namespaces=settings.namespaces)

    @kopf.on.startup()
    async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_kopf(settings)
        if elector is None:
            LEADER.set(1)
            leading.set()
        else:
            memo.election = asyncio.get_running_loop().create_task(elector.run())

    @kopf.on.cleanup()
    async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
        """After the controllers' own cleanups (registered first, run first): give up the Lease,
        stop the usage reader, close the HTTP session."""
        from tandem.operator import kubehttp

        for waiter in memo.leader_waiters:
            waiter.cancel()
        if elector is not None:
            memo.election.cancel()
            try:
                await elector.release()
            except Exception as error:  # the API server may be gone: the Lease then expires
                log.warning("could not give up the leader lease: %s", error)
        await usage.close()
        await kubehttp.close()

    @kopf.on.probe(id="tandem")
    async def _health(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        """Caches, queues and leadership into /healthz; a dead watch task makes it answer 500."""
        from tandem.operator.health import Unhealthy, report

        try:
            return report(controller_health(memo), leading.is_set(), time.time())
        except Unhealthy as error:
            raise kopf.PermanentError(str(error)) from error

    @kopf.on.login()
    async def _login(**kwargs: Any) -> Any:
        return limited_session(kwargs)

    start_http_server(settings.metrics_port)
    log.info(
        "metrics on :%d/metrics, liveness on :%d/healthz, watching %s",
        settings.metrics_port,
        settings.health_port,
        ", ".join(settings.namespaces) or "all namespaces",
    )
    # uvloop: its event loop and TLS are compiled (Cython over libuv), where asyncio's are Python; TLS
    # and socket I/O were a third of the operator's CPU at scale (docs/benchmarks.md, "Sixth round").
    # kopf picks uvloop by itself only under its own CLI, so the loop is made here.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        kopf.run(
            loop=runner.get_loop(),
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
            memo=kopf.Memo(settings=settings, leading=leading, leader_waiters=[], usage=usage),
        )
    return 0
