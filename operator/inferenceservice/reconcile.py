"""InferenceService reconcile logic as pure functions: spec and current status in, new status out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tandem.operator.api.inferenceservice import (
    InferenceServicePhase,
    InferenceServiceSpec,
    InferenceServiceStatus,
    ReplicaCounts,
    ServedModel,
    ServingCost,
)
from tandem.operator.config import OperatorSettings
from tandem.operator.handlers_common import accepted

#: Label every replica pod of a service carries; the scale subresource's selector uses it.
SERVICE_LABEL = "tandem.dev/inferenceservice"


def hourly_cost_usd(spec: InferenceServiceSpec, replicas: int, settings: OperatorSettings) -> float:
    """GPU cost per hour of `replicas` replicas at the operator's price for the service's GPU product."""
    return round(replicas * spec.resources.gpu * settings.gpu_price(spec.gpu_product), 4)


def accepted_status(
    name: str,
    spec: InferenceServiceSpec,
    current: Mapping[str, Any],
    generation: int,
    settings: OperatorSettings,
) -> InferenceServiceStatus:
    """The status of a valid InferenceService before any replica exists: every column has a value."""
    status = InferenceServiceStatus.model_validate(dict(current))
    if spec.suspend:
        phase = InferenceServicePhase.SUSPENDED
    elif status.phase is None or status.phase is InferenceServicePhase.SUSPENDED:
        phase = InferenceServicePhase.PENDING
    else:
        phase = status.phase
    desired = 0 if spec.suspend else spec.replicas.clamp()
    source = spec.model
    ref = source.training_job_ref
    return status.model_copy(
        update={
            "phase": phase,
            "observed_generation": generation,
            "replicas": ReplicaCounts(desired=desired, ready=status.replicas.ready if status.replicas else 0),
            "selector": f"{SERVICE_LABEL}={name}",
            "model": ServedModel(
                uri=source.uri,
                training_job=ref.name if ref else None,
                checkpoint_step=status.model.checkpoint_step if status.model else None,
            ),
            "cost": (status.cost or ServingCost()).model_copy(
                update={"hourly_usd": hourly_cost_usd(spec, desired, settings)}
            ),
            "conditions": accepted(generation, status.conditions),
        }
    )
