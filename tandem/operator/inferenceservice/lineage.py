"""Which model a service should serve: its `uri`, or a checkpoint of a TrainingJob (pure).

With `trainingJobRef.checkpoint: latest` the service follows the job's `status.lastCheckpoint`; with a step
number it serves `<checkpoint root>/step-<8 digits>` (the training driver's directory naming). Rollout
`manual` keeps the checkpoint the replicas run until the model part of the spec changes, and says
when a newer one exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.api.inferenceservice import InferenceServiceSpec, RolloutPolicy
from tandem.operator.inferenceservice.builders import ModelTarget, model_spec_hash
from tandem.operator.inferenceservice.observe import ObservedDeployment, ObservedTrainingJob

RESOLVED = "Resolved"
TRAINING_JOB_NOT_FOUND = "TrainingJobNotFound"
NO_CHECKPOINT = "NoCheckpoint"


@dataclass(frozen=True)
class Resolution:
    """The model to serve (None: nothing servable yet), why, and a newer checkpoint held back."""

    target: ModelTarget | None
    reason: str
    message: str
    #: With rollout `manual`: the step of a newer checkpoint than the one served.
    newer_step: int | None = None

    @property
    def resolved(self) -> bool:
        return self.reason == RESOLVED


def checkpoint_dir(root: str, step: int) -> str:
    """The URI of one checkpoint, as the training driver names it."""
    return f"{root.rstrip('/')}/step-{step:08d}"


def describe(target: ModelTarget) -> str:
    if target.training_job:
        return f"TrainingJob {target.training_job} checkpoint step {target.checkpoint_step} ({target.uri})"
    return target.uri


def _served(deployment: ObservedDeployment | None, job_name: str) -> ModelTarget | None:
    """The checkpoint of `job_name` the Deployment already serves, if any."""
    if deployment is None or deployment.training_job != job_name or not deployment.model_uri:
        return None
    return ModelTarget(
        uri=deployment.model_uri,
        training_job=job_name,
        checkpoint_step=deployment.checkpoint_step,
        checkpoint_claim=deployment.checkpoint_claim,
    )


def resolve(
    spec: InferenceServiceSpec,
    job: ObservedTrainingJob | None,
    deployment: ObservedDeployment | None,
) -> Resolution:
    """Pick the model for this tick. A missing job or checkpoint keeps serving what already runs."""
    if spec.model.uri is not None:
        target = ModelTarget(uri=spec.model.uri)
        return Resolution(target, RESOLVED, f"serving {target.uri}")
    ref = spec.model.training_job_ref
    assert ref is not None  # exactly one of uri / trainingJobRef (validated)
    served = _served(deployment, ref.name)
    keeping = f"; still serving step {served.checkpoint_step}" if served else ""
    if job is None:
        return Resolution(
            served, TRAINING_JOB_NOT_FOUND, f"TrainingJob {ref.name} not found in this namespace{keeping}"
        )
    claim = job.checkpoint_claim
    if ref.checkpoint != "latest":
        step = int(ref.checkpoint)
        if job.checkpoint_root is None:
            return Resolution(
                served, NO_CHECKPOINT, f"TrainingJob {ref.name} has no checkpoint storage{keeping}"
            )
        if job.last_checkpoint_step is None or step > job.last_checkpoint_step:
            newest = "none yet" if job.last_checkpoint_step is None else f"step {job.last_checkpoint_step}"
            return Resolution(
                served,
                NO_CHECKPOINT,
                f"TrainingJob {ref.name} has not written checkpoint step {step} (latest: {newest}){keeping}",
            )
        target = ModelTarget(checkpoint_dir(job.checkpoint_root, step), ref.name, step, claim)
        return Resolution(target, RESOLVED, f"serving {describe(target)}")
    if job.last_checkpoint_uri is None or job.last_checkpoint_step is None:
        return Resolution(
            served, NO_CHECKPOINT, f"TrainingJob {ref.name} has written no checkpoint yet{keeping}"
        )
    latest = ModelTarget(job.last_checkpoint_uri, ref.name, job.last_checkpoint_step, claim)
    if (
        spec.rollout.on_new_checkpoint is RolloutPolicy.MANUAL
        and served is not None
        and deployment is not None
        and deployment.model_spec_hash == model_spec_hash(spec)
        and (served.checkpoint_step or 0) < job.last_checkpoint_step
    ):
        return Resolution(
            served,
            RESOLVED,
            f"serving {describe(served)}; step {job.last_checkpoint_step} is newer (rollout manual)",
            newer_step=job.last_checkpoint_step,
        )
    return Resolution(latest, RESOLVED, f"serving {describe(latest)}")
