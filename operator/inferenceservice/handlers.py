"""kopf handlers for InferenceService: thin glue between kopf and the pure reconcile logic."""

from __future__ import annotations

from typing import Any

import kopf

from tandem.operator.api.common import GROUP, VERSION
from tandem.operator.api.inferenceservice import (
    KIND,
    PLURAL,
    InferenceServicePhase,
    InferenceServiceSpec,
)
from tandem.operator.handlers_common import parse_spec_or_reject
from tandem.operator.inferenceservice.reconcile import accepted_status
from tandem.operator.metrics import timed_reconcile


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile_inferenceservice(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Validate the spec and publish the status every `kubectl get tisvc` column reads."""
    with timed_reconcile(KIND):
        generation = int(meta.get("generation") or 0)
        service = parse_spec_or_reject(
            InferenceServiceSpec, body, spec, status, generation, patch, InferenceServicePhase.FAILED.value
        )
        new_status = accepted_status(str(meta["name"]), service, status, generation, memo.settings)
        if status.get("phase") != new_status.phase:
            kopf.event(
                body,
                type="Normal",
                reason=str(new_status.phase),
                message=f"InferenceService is {new_status.phase}",
            )
        patch.status.update(new_status.to_dict())
