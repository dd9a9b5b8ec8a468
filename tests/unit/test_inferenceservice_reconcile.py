"""The InferenceService state machine and lineage as pure functions: observations in, decisions out."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from tandem.operator.config import OperatorSettings
from tandem.operator.cost import Amounts, Container
from tandem.operator.inferenceservice import builders
from tandem.operator.inferenceservice.builders import Service
from tandem.operator.inferenceservice.observe import (
    ObservedDeployment,
    ObservedReplica,
    ObservedTrainingJob,
    observe_deployment,
    observe_replica,
    observe_trainingjob,
)
from tandem.operator.inferenceservice.reconcile import Decision, Observed, ScalingInfo, decide

T0 = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()
SPEC: dict[str, Any] = {
    "model": {"uri": "pvc://models/minilm"},
    "runtime": "embeddings",
    "resources": {"gpu": 1},
    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    "replicas": {"min": 1, "max": 4, "count": 2},
}
LINEAGE: dict[str, Any] = {
    "model": {"trainingJobRef": {"name": "gpt-tiny"}},
    "runtime": "causal-lm",
    "replicas": {"min": 1, "max": 4, "count": 1},
}


def svc(**spec: Any) -> Service:
    return Service("embed", "ml", "uid", InferenceServiceSpec.model_validate({**SPEC, **spec}), "img")


def applied(decision: Decision, ready: int | None = None, **changes: Any) -> ObservedDeployment:
    """The Deployment as the API server would show it after `decision.apply`, `ready` replicas ready."""
    assert decision.apply is not None
    manifest = decision.apply
    replicas = manifest["spec"]["replicas"]
    ready = replicas if ready is None else ready
    body = {
        **manifest,
        "metadata": {**manifest["metadata"], "generation": 1},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
        },
    }
    return replace(observe_deployment(body), **changes)


def replica(name: str = "embed-1", ready: bool = True, bound: bool = True, **extra: Any) -> ObservedReplica:
    return ObservedReplica(
        name=name,
        ip="10.0.0.1" if bound else None,
        bound=bound,
        ready=ready,
        deleting=False,
        fatal=extra.get("fatal", ""),
        unschedulable=extra.get("unschedulable", ""),
        on_node=bound,
        containers=(Container(Amounts(gpus=1)),),  # SPEC's resources: one GPU
    )


def job(step: int | None = 100, claim: str | None = "ckpt") -> ObservedTrainingJob:
    body: dict[str, Any] = {
        "metadata": {"name": "gpt-tiny", "namespace": "ml"},
        "spec": {"checkpoint": {"storage": {"pvc": claim} if claim else {"uri": "s3://b/gpt"}}},
        "status": {"phase": "Running"},
    }
    if step is not None:
        root = "file:///checkpoints/ml/gpt-tiny" if claim else "s3://b/gpt"
        body["status"]["lastCheckpoint"] = {"step": step, "uri": f"{root}/step-{step:08d}"}
    return observe_trainingjob(body)


def tick(
    service: Service,
    observed: Observed | None = None,
    status: InferenceServiceStatus | None = None,
    generation: int = 1,
) -> Decision:
    return decide(
        service, generation, status or InferenceServiceStatus(), observed or Observed(), T0, SETTINGS
    )


def conditions(decision: Decision) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in decision.status.conditions}


def test_a_new_service_creates_its_children_and_is_pending() -> None:
    decision = tick(svc())
    assert decision.apply is not None
    assert decision.apply["spec"]["replicas"] == 2
    assert [c["kind"] for c in decision.create] == ["Service", "PodDisruptionBudget"]
    status = decision.status.to_dict()
    assert status["phase"] == "Pending"
    assert status["url"] == "http://embed.ml.svc"
    assert status["selector"] == "tandem.dev/inferenceservice=embed"
    assert status["replicas"] == {"desired": 2, "ready": 0}
    assert status["cost"]["hourlyUSD"] == 0  # no replica on a node yet: nothing costs
    assert [e.reason for e in decision.events] == ["Created", "Pending"]


def test_existing_children_are_left_alone_and_a_current_deployment_is_not_reapplied() -> None:
    first = tick(svc())
    observed = Observed(
        deployment=applied(first),
        replicas=[replica("a"), replica("b")],
        children=frozenset({"Service", "PodDisruptionBudget"}),
    )
    second = tick(svc(), observed, first.status)
    assert second.apply is None
    assert second.create == []
    assert second.status.phase == "Ready"
    assert second.status.to_dict()["replicas"] == {"desired": 2, "ready": 2}
    assert conditions(second)["Ready"] == ("True", "ReplicasReady")
    assert [e.reason for e in second.events] == ["Ready"]


def test_the_service_monitor_is_created_where_its_crd_exists() -> None:
    decision = tick(svc(), Observed(service_monitor_crd=True, children=frozenset({"Service"})))
    assert [c["kind"] for c in decision.create] == ["PodDisruptionBudget", "ServiceMonitor"]


def test_phases_follow_the_replicas() -> None:
    first = tick(svc())
    deployment = applied(first, ready=0)
    unbound = [replica("a", ready=False, bound=False, unschedulable="0/3 nodes are available")]
    pending = tick(svc(), Observed(deployment=deployment, replicas=unbound), first.status)
    assert pending.status.phase == "Pending"
    assert conditions(pending)["Ready"] == ("False", "Unschedulable")
    loading = tick(svc(), Observed(deployment=deployment, replicas=[replica("a", ready=False)]), first.status)
    assert loading.status.phase == "Loading"
    crashing = [replica("a", ready=False, fatal="container server: CrashLoopBackOff")]
    failed = tick(svc(), Observed(deployment=deployment, replicas=crashing), loading.status)
    assert failed.status.phase == "Failed"
    assert conditions(failed)["Failed"] == ("True", "ReplicaFailed")
    assert [e.type for e in failed.events] == ["Warning"]
    recovered = tick(svc(), Observed(deployment=applied(first), replicas=[replica("a")]), failed.status)
    assert recovered.status.phase == "Ready"
    assert conditions(recovered)["Failed"] == ("False", "Recovered")


def test_scaling_changes_the_deployment_and_the_last_scale_time() -> None:
    first = tick(svc())
    observed = Observed(deployment=applied(first), replicas=[replica("a"), replica("b")])
    ready = tick(svc(), observed, first.status)
    scaled = tick(svc(replicas={"min": 1, "max": 4, "count": 3}), observed, ready.status, generation=2)
    assert scaled.apply is not None
    assert scaled.apply["spec"]["replicas"] == 3
    assert scaled.status.last_scale_time == T0
    assert scaled.status.phase == "Ready"
    assert conditions(scaled)["Ready"] == ("True", "ScalingUp")
    assert scaled.status.observed_generation == 2


def test_suspend_scales_to_zero_keeps_everything_and_resume_restores_the_count() -> None:
    first = tick(svc())
    observed = Observed(
        deployment=applied(first),
        replicas=[replica("a"), replica("b")],
        children=frozenset({"Service", "PodDisruptionBudget"}),
    )
    ready = tick(svc(), observed, first.status)
    suspended = tick(svc(suspend=True), observed, ready.status, generation=2)
    assert suspended.apply is not None
    assert suspended.apply["spec"]["replicas"] == 0
    assert suspended.create == []  # Service and PDB stay (only the Deployment changes)
    assert suspended.status.phase == "Suspended"
    assert suspended.status.cost is not None
    assert suspended.status.cost.hourly_usd == 2 * 4.0  # the replicas cost until they are gone
    observed = Observed(deployment=applied(suspended), replicas=[])
    gone = tick(svc(suspend=True), observed, suspended.status, generation=2)
    assert gone.status.cost is not None
    assert gone.status.cost.hourly_usd == 0
    resumed = tick(svc(), observed, suspended.status, generation=3)
    assert resumed.apply is not None
    assert resumed.apply["spec"]["replicas"] == 2
    assert resumed.status.phase == "Pending"


def test_cost_per_million_requests_and_tokens_comes_from_the_observed_rates() -> None:
    status = InferenceServiceStatus.model_validate({"metrics": {"rps": 100.0, "tokensPerSecond": 2000.0}})
    decision = tick(svc(), Observed(replicas=[replica("a"), replica("b")]), status=status)
    assert decision.status.cost is not None
    # $8/h at 360,000 requests/h and 7.2 million tokens/h.
    assert decision.status.cost.usd_per_million_requests == round(8 / 360_000 * 1e6, 4)
    assert decision.status.cost.usd_per_million_tokens == round(8 / 7_200_000 * 1e6, 4)


def test_lineage_serves_the_latest_checkpoint_and_rolls_forward_on_a_newer_one() -> None:
    service = Service("gpt", "ml", "uid", InferenceServiceSpec.model_validate(LINEAGE), "img")
    first = tick(service, Observed(training_job=job(100)))
    assert first.apply is not None
    command = first.apply["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "file:///checkpoints/ml/gpt-tiny/step-00000100" in command
    claims = [v for v in first.apply["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == ["ckpt"]
    assert conditions(first)["ModelResolved"] == ("True", "Resolved")
    served = tick(service, Observed(deployment=applied(first), replicas=[replica()], training_job=job(100)))
    assert served.status.to_dict()["model"] == {
        "uri": "file:///checkpoints/ml/gpt-tiny/step-00000100",
        "trainingJob": "gpt-tiny",
        "checkpointStep": 100,
    }
    assert served.status.model_display == "gpt-tiny@100"

    newer = tick(
        service,
        Observed(deployment=applied(first), replicas=[replica()], training_job=job(200)),
        served.status,
    )
    assert newer.apply is not None
    assert (
        "file:///checkpoints/ml/gpt-tiny/step-00000200"
        in newer.apply["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    assert any(e.reason == "RollingOut" and "step 200" in e.message for e in newer.events)
    assert newer.status.model is not None
    assert newer.status.model.checkpoint_step == 100
    done = tick(
        service,
        Observed(deployment=applied(newer), replicas=[replica()], training_job=job(200)),
        newer.status,
    )
    assert done.status.model is not None
    assert done.status.model.checkpoint_step == 200


def test_manual_rollout_only_reports_a_newer_checkpoint() -> None:
    manual = InferenceServiceSpec.model_validate({**LINEAGE, "rollout": {"onNewCheckpoint": "manual"}})
    service = Service("gpt", "ml", "uid", manual, "img")
    first = tick(service, Observed(training_job=job(100)))
    newer = tick(service, Observed(deployment=applied(first), replicas=[replica()], training_job=job(200)))
    assert newer.apply is None
    assert conditions(newer)["NewCheckpointAvailable"] == ("True", "NewerCheckpoint")
    assert any(e.reason == "NewCheckpointAvailable" for e in newer.events)
    assert newer.status.model is not None
    assert newer.status.model.checkpoint_step == 100


def test_a_pinned_step_serves_that_checkpoint_once_written() -> None:
    pinned = InferenceServiceSpec.model_validate(
        {**LINEAGE, "model": {"trainingJobRef": {"name": "gpt-tiny", "checkpoint": 150}}}
    )
    service = Service("gpt", "ml", "uid", pinned, "img")
    early = tick(service, Observed(training_job=job(100)))
    assert early.apply is None
    assert conditions(early)["ModelResolved"] == ("False", "NoCheckpoint")
    assert "step 150" in early.status.conditions[-1].message or any(
        "step 150" in c.message for c in early.status.conditions
    )
    later = tick(service, Observed(training_job=job(300)))
    assert later.apply is not None
    assert (
        "file:///checkpoints/ml/gpt-tiny/step-00000150"
        in later.apply["spec"]["template"]["spec"]["containers"][0]["command"]
    )


def test_a_missing_job_or_checkpoint_is_a_clear_condition_not_a_crash() -> None:
    service = Service("gpt", "ml", "uid", InferenceServiceSpec.model_validate(LINEAGE), "img")
    missing = tick(service)
    assert missing.apply is None
    assert missing.status.phase == "Pending"
    assert conditions(missing)["ModelResolved"] == ("False", "TrainingJobNotFound")
    assert missing.status.model_display == "gpt-tiny@?"
    assert [e.reason for e in missing.events] == ["TrainingJobNotFound", "Pending"]
    again = tick(service, status=missing.status)
    assert again.events == []  # said once
    none_yet = tick(service, Observed(training_job=job(None)), missing.status)
    assert conditions(none_yet)["ModelResolved"] == ("False", "NoCheckpoint")
    # A job deleted under a running service: keep serving what runs, say why.
    first = tick(service, Observed(training_job=job(100)))
    gone = tick(service, Observed(deployment=applied(first), replicas=[replica()]))
    assert gone.apply is None
    assert gone.status.phase == "Ready"
    status, reason = conditions(gone)["ModelResolved"]
    assert (status, reason) == ("False", "TrainingJobNotFound")


def test_scaling_condition_reports_the_mode() -> None:
    fixed = tick(svc())
    assert conditions(fixed)["ScalingActive"] == ("False", "FixedReplicas")
    external = tick(svc(autoscaling={"mode": "external"}))
    assert conditions(external)["ScalingActive"] == ("True", "External")
    builtin = tick(svc(autoscaling={"metric": "rps", "target": 5}))
    assert conditions(builtin)["ScalingActive"] == ("False", "NoMetrics")
    info = ScalingInfo(True, "Stable", "rps 4.0 ...")
    active = tick(svc(autoscaling={"metric": "rps", "target": 5}), Observed(scaling=info))
    assert conditions(active)["ScalingActive"] == ("True", "Stable")


def test_observers_read_the_api_objects() -> None:
    pod = {
        "metadata": {"name": "embed-abc"},
        "spec": {"nodeName": "gpu-node-0"},
        "status": {
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {"name": "server", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such"}}}
            ],
        },
    }
    seen = observe_replica(pod)
    assert (seen.ip, seen.bound, seen.ready) == ("10.0.0.7", True, False)
    assert seen.fatal == "container server: ImagePullBackOff (no such)"
    unschedulable = observe_replica(
        {
            "metadata": {"name": "p"},
            "status": {"conditions": [{"type": "PodScheduled", "status": "False", "message": "no GPU"}]},
        }
    )
    assert unschedulable.unschedulable == "no GPU"
    uri_job = job(50, claim=None)
    assert (uri_job.checkpoint_root, uri_job.checkpoint_claim) == ("s3://b/gpt", None)
    assert job(None).checkpoint_root == "file:///checkpoints/ml/gpt-tiny"
    stuck = observe_deployment(
        {
            "metadata": {"name": "d", "generation": 2},
            "spec": {"replicas": 1},
            "status": {
                "observedGeneration": 2,
                "conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "m"}],
            },
        }
    )
    assert stuck.progress_failure == "m"
    assert not stuck.rolled_out
    assert builders.selector("x") == "tandem.dev/inferenceservice=x"


def test_serving_cost_counts_only_replicas_on_nodes_and_accrues_the_rate_that_ran() -> None:
    """100 replicas x 8 GPUs asked for, none scheduled: $0/h, not $3,200/h. Spend accrues at the rate
    in force since the last update: at once when the rate changes, else every 30 seconds."""
    big = svc(resources={"gpu": 8}, replicas={"min": 1, "max": 100, "count": 100})
    pending = [replica(f"p{i}", ready=False, bound=False) for i in range(100)]
    nothing = tick(big, Observed(replicas=pending))
    assert nothing.status.cost is not None
    assert (nothing.status.cost.hourly_usd, nothing.status.cost.gpus) == (0, 0)
    assert nothing.status.cost.allocation is None  # nothing on a node: nothing allocated
    eight_gpus = [replace(replica("a"), containers=(Container(Amounts(gpus=8)),))]
    first = decide(big, 1, nothing.status, Observed(replicas=eight_gpus), T0, SETTINGS)
    assert first.status.cost is not None
    assert (first.status.cost.hourly_usd, first.status.cost.gpus, first.status.cost.usd) == (32.0, 8, 0)
    assert first.status.cost.allocation == "requests"  # no usage measured here
    soon = decide(big, 1, first.status, Observed(replicas=eight_gpus), T0 + timedelta(seconds=10), SETTINGS)
    assert soon.status.to_dict() == first.status.to_dict()  # same rate, under 30 s: no status write
    later = T0 + timedelta(minutes=30)
    half_hour = decide(big, 1, first.status, Observed(replicas=eight_gpus), later, SETTINGS)
    assert half_hour.status.cost is not None
    assert half_hour.status.cost.usd == 16.0
    assert half_hour.status.cost.gpu_hours == 4.0
    # The replica goes 15 minutes later: those 15 minutes at $32/h count, then nothing more accrues.
    gone_at = later + timedelta(minutes=15)
    gone = decide(big, 1, half_hour.status, Observed(replicas=[]), gone_at, SETTINGS)
    assert gone.status.cost is not None
    assert (gone.status.cost.usd, gone.status.cost.hourly_usd) == (24.0, 0)
    idle = decide(big, 1, gone.status, Observed(replicas=[]), gone_at + timedelta(hours=5), SETTINGS)
    assert idle.status.cost is not None
    assert idle.status.cost.usd == 24.0


# -- lineage of a served fine-tune: both models, the fine-tune's checkpoint and its base ----------------


def fine_tune(base: dict[str, Any], lora: bool = True, step: int = 40) -> ObservedTrainingJob:
    tuning: dict[str, Any] = {"base": base} | ({"lora": {"rank": 8}} if lora else {})
    return observe_trainingjob(
        {
            "metadata": {"name": "gpt-tiny", "namespace": "ml"},
            "spec": {
                "trainer": {"builtin": {"dataset": {"uri": "pvc://d/x.txt"}, "fineTuning": tuning}},
                "checkpoint": {"storage": {"pvc": "ckpt"}},
            },
            "status": {
                "phase": "Succeeded",
                "lastCheckpoint": {"step": step, "uri": f"file:///checkpoints/ml/gpt-tiny/step-{step:08d}"},
            },
        }
    )


def test_a_served_lora_fine_tune_shows_its_base_in_status_and_kubectl_get() -> None:
    service = Service("gpt", "ml", "uid", InferenceServiceSpec.model_validate(LINEAGE), "img")
    job = fine_tune({"trainingJobRef": {"name": "gpt-pretrain", "checkpoint": 200}})
    first = tick(service, Observed(training_job=job))
    # before any replica runs, status already says where the model comes from, base included
    assert first.status.to_dict()["model"]["base"] == {
        "method": "lora",
        "trainingJob": "gpt-pretrain",
        "checkpoint": "200",
    }
    served = tick(service, Observed(deployment=applied(first), replicas=[replica()], training_job=job))
    assert served.status.to_dict()["model"] == {
        "uri": "file:///checkpoints/ml/gpt-tiny/step-00000040",
        "trainingJob": "gpt-tiny",
        "checkpointStep": 40,
        "base": {"method": "lora", "trainingJob": "gpt-pretrain", "checkpoint": "200"},
    }
    assert served.status.model_display == "gpt-tiny@40<-gpt-pretrain@200"


def test_a_full_fine_tune_from_a_uri_shows_the_uri_and_a_model_trained_from_scratch_shows_no_base() -> None:
    service = Service("gpt", "ml", "uid", InferenceServiceSpec.model_validate(LINEAGE), "img")
    job = fine_tune({"uri": "s3://models/gpt/step-00000500"}, lora=False)
    first = tick(service, Observed(training_job=job))
    served = tick(service, Observed(deployment=applied(first), replicas=[replica()], training_job=job))
    assert served.status.to_dict()["model"]["base"] == {
        "method": "full",
        "uri": "s3://models/gpt/step-00000500",
    }
    assert served.status.model_display == "gpt-tiny@40<-s3://models/gpt/step-00000500"
    scratch = observe_trainingjob(
        {
            "metadata": {"name": "gpt-tiny", "namespace": "ml"},
            "spec": {"checkpoint": {"storage": {"pvc": "c"}}},
        }
    )
    assert scratch.base is None
