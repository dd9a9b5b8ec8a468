"""kopf handlers for TrainingJob: thin glue between kopf and the pure reconcile logic."""

from __future__ import annotations

from typing import Any

import kopf

from tandem.operator.api.common import GROUP, VERSION
from tandem.operator.api.trainingjob import KIND, PLURAL, TrainingJobPhase, TrainingJobSpec
from tandem.operator.handlers_common import parse_spec_or_reject
from tandem.operator.metrics import timed_reconcile
from tandem.operator.trainingjob.reconcile import accepted_status


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile_trainingjob(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """Validate the spec and publish the status every `kubectl get tj` column reads."""
    with timed_reconcile(KIND):
        generation = int(meta.get("generation") or 0)
        job = parse_spec_or_reject(
            TrainingJobSpec, body, spec, status, generation, patch, TrainingJobPhase.FAILED.value
        )
        new_status = accepted_status(job, status, generation)
        if status.get("phase") != new_status.phase:
            kopf.info(
                body,
                reason=str(new_status.phase),
                message=f"TrainingJob is {new_status.phase} ({job.workers.replicas} workers)",
            )
        patch.status.update(new_status.to_dict())
