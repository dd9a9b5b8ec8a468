"""What the operator sees of an InferenceService's world, reduced to small immutable facts.

Lean watch caches feed these from watch events (no API reads per reconcile); the state machine in
`reconcile` reads only these, so it is tested on hand-made observations.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tandem.api.inferenceservice import FineTunedFrom
from tandem.operator import cost
from tandem.operator.inferenceservice.builders import (
    ANNOTATION_CHECKPOINT_CLAIM,
    ANNOTATION_CHECKPOINT_STEP,
    ANNOTATION_MODEL_SPEC_HASH,
    ANNOTATION_MODEL_URI,
    ANNOTATION_SPEC_HASH,
    ANNOTATION_TRAINING_JOB,
)

#: Container states that will not fix themselves: the service is Failed until the spec or image changes.
FATAL_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
#: A checkpoint directory, as the training driver names it (`step-00000100`).
CHECKPOINT_DIR = re.compile(r"^(?P<root>.+)/step-(?P<step>\d{8,})/?$")


@dataclass(frozen=True)
class ObservedDeployment:
    """The model-server Deployment as last seen."""

    name: str
    generation: int
    observed_generation: int
    replicas: int
    status_replicas: int
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    spec_hash: str
    model_uri: str | None
    training_job: str | None
    checkpoint_step: int | None
    model_spec_hash: str | None
    progress_failure: str
    checkpoint_claim: str | None = None

    @property
    def rolled_out(self) -> bool:
        """Every replica runs the current template and is ready (nothing left to roll)."""
        return (
            self.observed_generation >= self.generation
            and self.updated_replicas >= self.replicas
            and self.status_replicas <= self.replicas
            and self.ready_replicas >= self.replicas
        )


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def observe_deployment(body: Mapping[str, Any]) -> ObservedDeployment:
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    progressing: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or () if c.get("type") == "Progressing"),
        {},
    )
    failure = ""
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        failure = str(progressing.get("message") or "the rollout exceeded its progress deadline")
    step = annotations.get(ANNOTATION_CHECKPOINT_STEP)
    return ObservedDeployment(
        name=str(meta.get("name")),
        generation=_int(meta.get("generation")),
        observed_generation=_int(status.get("observedGeneration")),
        replicas=_int(spec.get("replicas", 1)),
        status_replicas=_int(status.get("replicas")),
        updated_replicas=_int(status.get("updatedReplicas")),
        ready_replicas=_int(status.get("readyReplicas")),
        available_replicas=_int(status.get("availableReplicas")),
        spec_hash=str(annotations.get(ANNOTATION_SPEC_HASH, "")),
        model_uri=annotations.get(ANNOTATION_MODEL_URI),
        training_job=annotations.get(ANNOTATION_TRAINING_JOB),
        checkpoint_step=_int(step) if step is not None else None,
        model_spec_hash=annotations.get(ANNOTATION_MODEL_SPEC_HASH),
        progress_failure=failure,
        checkpoint_claim=annotations.get(ANNOTATION_CHECKPOINT_CLAIM),
    )


@dataclass(frozen=True)
class ObservedReplica:
    """One replica pod: where it is, whether it serves, and why not."""

    name: str
    ip: str | None
    bound: bool
    ready: bool
    deleting: bool
    #: A waiting reason that will not fix itself (CrashLoopBackOff, ImagePullBackOff, ...), with its message.
    fatal: str
    #: The scheduler's reason while the pod is unschedulable.
    unschedulable: str
    #: Whether it holds a node's resources (bound and not finished), and its containers' priced requests.
    on_node: bool = False
    containers: tuple[cost.Container, ...] = ()


def observe_replica(pod: Mapping[str, Any]) -> ObservedReplica:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    scheduled = conditions.get("PodScheduled") or {}
    fatal = ""
    for container in status.get("containerStatuses") or ():
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING_REASONS:
            detail = waiting.get("message") or ""
            fatal = f"container {container.get('name')}: {waiting['reason']}" + (
                f" ({detail})" if detail else ""
            )
            break
    return ObservedReplica(
        name=str(meta.get("name")),
        ip=status.get("podIP") or None,
        bound=bool((pod.get("spec") or {}).get("nodeName")),
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        fatal=fatal,
        unschedulable=str(scheduled.get("message") or "Unschedulable")
        if scheduled.get("status") == "False"
        else "",
        on_node=cost.on_node(status.get("phase"), (pod.get("spec") or {}).get("nodeName")),
        containers=cost.containers_of(pod),
    )


@dataclass(frozen=True)
class ObservedTrainingJob:
    """What lineage needs of a TrainingJob: its newest checkpoint and where its checkpoints live."""

    name: str
    phase: str | None
    last_checkpoint_step: int | None
    last_checkpoint_uri: str | None
    #: The job's checkpoint claim (`spec.checkpoint.storage.pvc`): replicas mount it where training does.
    checkpoint_claim: str | None
    #: The checkpoint root URI, when the job has checkpoint storage.
    checkpoint_root: str | None
    #: The base a fine-tuning job started from (`spec.trainer.builtin.fineTuning`), for the lineage.
    base: FineTunedFrom | None = None


def observe_trainingjob(
    body: Mapping[str, Any], checkpoint_mount: str = "/checkpoints"
) -> ObservedTrainingJob:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    last = status.get("lastCheckpoint") or {}
    storage = (spec.get("checkpoint") or {}).get("storage") or {}
    claim = storage.get("pvc") or None
    name = str(meta.get("name"))
    if claim:
        root: str | None = f"file://{checkpoint_mount}/{meta.get('namespace')}/{name}"
    else:
        root = storage.get("uri") or None
    uri = last.get("uri") or None
    match = CHECKPOINT_DIR.match(uri) if uri else None
    if match:  # the driver's own root wins over the derived one (they agree unless storage moved)
        root = match["root"]
    step = last.get("step")
    return ObservedTrainingJob(
        name=name,
        phase=status.get("phase"),
        last_checkpoint_step=_int(step) if step is not None else None,
        last_checkpoint_uri=uri,
        checkpoint_claim=claim,
        checkpoint_root=root.rstrip("/") if root else None,
        base=fine_tuned_from(spec),
    )


def fine_tuned_from(spec: Mapping[str, Any]) -> FineTunedFrom | None:
    """The base checkpoint of a fine-tuning TrainingJob's spec (wire form), or None."""
    tuning = ((spec.get("trainer") or {}).get("builtin") or {}).get("fineTuning")
    if not isinstance(tuning, Mapping):
        return None
    base = tuning.get("base") or {}
    ref = base.get("trainingJobRef") or {}
    return FineTunedFrom(
        method="lora" if tuning.get("lora") is not None else "full",
        training_job=ref.get("name") or None,
        checkpoint=str(ref.get("checkpoint", "latest")) if ref else None,
        uri=base.get("uri") or None,
    )
