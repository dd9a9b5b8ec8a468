"""Start the operator: kopf with Tandem's storage settings, /metrics and a liveness endpoint."""

from __future__ import annotations

import logging
from typing import Any

from tandem.operator.config import OperatorSettings

ANNOTATION_PREFIX = "tandem.dev"
HANDLER_THREADS = 4
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
    # kopf's threads for sync handlers (the node index).
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


def run_operator(settings: OperatorSettings, verbose: bool = False) -> int:
    """Run until interrupted. Handlers are registered by importing their modules."""
    import kopf
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

    @kopf.on.startup()
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)

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
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
        memo=kopf.Memo(settings=settings),
    )
    return 0
