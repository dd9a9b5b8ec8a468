"""TrainingJob reconcile logic as pure functions: spec and current status in, new status out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tandem.operator.api.trainingjob import (
    Progress,
    TrainingCost,
    TrainingJobPhase,
    TrainingJobSpec,
    TrainingJobStatus,
    WorkerCounts,
)
from tandem.operator.handlers_common import accepted


def accepted_status(spec: TrainingJobSpec, current: Mapping[str, Any], generation: int) -> TrainingJobStatus:
    """The status of a valid TrainingJob before any pod exists: every column has a value.

    Facts already observed (phase, progress, checkpoints, restarts, cost) are kept, so re-running this
    on an operator restart loses nothing.
    """
    status = TrainingJobStatus.model_validate(dict(current))
    if spec.suspend:
        phase = TrainingJobPhase.SUSPENDED
    elif status.phase is None or status.phase is TrainingJobPhase.SUSPENDED:
        phase = TrainingJobPhase.PENDING
    else:
        phase = status.phase
    total_steps = spec.trainer.builtin.max_steps if spec.trainer.builtin else None
    progress = status.progress or Progress(step=0)
    return status.model_copy(
        update={
            "phase": phase,
            "observed_generation": generation,
            "workers": WorkerCounts(
                desired=spec.workers.replicas, ready=status.workers.ready if status.workers else 0
            ),
            "progress": progress.model_copy(update={"total_steps": total_steps or progress.total_steps}),
            "restarts": status.restarts or 0,
            "cost": status.cost or TrainingCost(gpu_hours=0.0, usd=0.0),
            "conditions": accepted(generation, status.conditions),
        }
    )
