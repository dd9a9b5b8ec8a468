"""TrainingJob -> child manifests, as pure functions (golden-tested without a cluster).

Children of attempt N: one head pod `<job>-<N>-head`, worker pods `<job>-<N>-worker-<i>`, and one
Service `<job>-head` (stable across attempts) with its EndpointSlice, which names the current head.
Names are deterministic, so creating a child twice is a harmless 409, and an operator restarted
mid-way finds what it made.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from tandem.api.common import API_VERSION
from tandem.api.trainingjob import KIND, TrainingJobSpec
from tandem.api.trainingrun import DATA_ROOT, METRICS_PORT, RAY_GCS_PORT, RUN_ENV, TrainingRun
from tandem.operator.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE, GPU_TOLERATION

LABEL_JOB = "tandem.dev/trainingjob"
LABEL_ROLE = "tandem.dev/role"
LABEL_ATTEMPT = "tandem.dev/attempt"
LABEL_INDEX = "tandem.dev/worker-index"
#: Hash of the spec fields that shape the pods: a change replaces the gang (not counted as a failure).
LABEL_SPEC_HASH = "tandem.dev/spec-hash"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
#: Gang labels/annotations understood by the coscheduling plugin and by Volcano.
LABEL_POD_GROUP = "scheduling.x-k8s.io/pod-group"
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
ANNOTATION_GANG_SIZE = "tandem.dev/gang-size"
#: The training driver writes its progress record (JSON) here, on the head pod.
PROGRESS_ANNOTATION = "tandem.dev/progress"

RAY_DASHBOARD_PORT = 8265
#: The head's ports, as its Service and EndpointSlice publish them.
HEAD_PORTS = {"gcs": RAY_GCS_PORT, "dashboard": RAY_DASHBOARD_PORT, "metrics": METRICS_PORT}
#: Who maintains the head's EndpointSlice (the cluster's EndpointSlice controller leaves it alone).
ENDPOINTS_MANAGER = "tandem-operator"
CHECKPOINT_MOUNT = "/checkpoints"
#: `pvc://CLAIM/PATH` data sets are mounted at DATASET_MOUNT/CLAIM; the driver resolves them there.
DATASET_MOUNT = DATA_ROOT
#: Pod Security "restricted" for every training pod: the image's user, which must not be root (the
#: project's images run as 65532, numerically so the kubelet can check), no privilege escalation, no
#: capabilities, the runtime's default seccomp profile, and a read-only root file system: what the
#: workload writes goes to WRITABLE_DIRS (emptyDir volumes) or to the checkpoint and data mounts.
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}
#: The writable places of a training container under its read-only root, one emptyDir each (they live
#: as long as the pod, on the node's disk): /tmp holds Ray's session files (/tmp/ray: logs, sockets,
#: spilled objects), Python's temp files, the run's local Ray Train storage and the s3:// data cache;
#: the workloads image's home folder (its HOME and working directory, images/workloads.Dockerfile)
#: takes the caches of Triton, torch and the like under ~/.cache. An image built on another base must
#: keep that HOME (the run document stays the pod's only configuration: no HOME variable is set).
#: /dev/shm, Ray's object store, is the runtime's own tmpfs and stays writable.
HOME_DIR = "/home/tandem"
WRITABLE_DIRS = {"tmp": "/tmp", "home": HOME_DIR}
#: Long enough for the driver to write a checkpoint after SIGTERM.
TERMINATION_GRACE_SECONDS = 120


def head_pod_name(job: str, attempt: int) -> str:
    return f"{job}-{attempt}-head"


def worker_pod_name(job: str, attempt: int, index: int) -> str:
    return f"{job}-{attempt}-worker-{index}"


def head_service_name(job: str) -> str:
    return f"{job}-head"


def trainer_account(job: str) -> str:
    """The ServiceAccount (and Role, RoleBinding) of one job's pods."""
    return f"{job}-trainer"


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def checkpoint_uri(spec: TrainingJobSpec, namespace: str, job: str) -> str | None:
    """Where this job's checkpoints live, as the driver sees it (a PVC is mounted at /checkpoints)."""
    if spec.checkpoint is None:
        return None
    storage = spec.checkpoint.storage
    if storage.pvc:
        return f"file://{CHECKPOINT_MOUNT}/{namespace}/{job}"
    return storage.uri


def dataset_claim(spec: TrainingJobSpec) -> str | None:
    """The claim of a `pvc://claim/path` data set, else None."""
    builtin = spec.trainer.builtin
    if builtin is None or not builtin.dataset.uri.startswith("pvc://"):
        return None
    return builtin.dataset.uri.removeprefix("pvc://").partition("/")[0]


def _resources(cpu: Any, memory: Any, gpu: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {}
    if cpu is not None:
        amounts["cpu"] = str(cpu)
    if memory is not None:
        amounts["memory"] = str(memory)
    if gpu:
        amounts[GPU_RESOURCE] = str(gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_spec_hash(spec: TrainingJobSpec) -> str:
    """Hash of what the pods are made of; lifecycle fields (suspend, deadlines, TTL, restarts) excluded.

    Only fields that differ from their defaults count, so an operator upgrade that adds a defaulted
    field (or a user writing a default out) does not replace every running gang."""
    shaping = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
    for lifecycle in ("suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "failurePolicy"):
        shaping.pop(lifecycle, None)
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _labels(
    job: str, role: str, attempt: int, spec: TrainingJobSpec, spec_hash: str | None = None
) -> dict[str, str]:
    labels = {
        LABEL_JOB: job,
        LABEL_ROLE: role,
        LABEL_ATTEMPT: str(attempt),
        LABEL_SPEC_HASH: spec_hash or pod_spec_hash(spec),
        LABEL_POD_GROUP: f"{job}-{attempt}",
        "app.kubernetes.io/name": "tandem-training",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/managed-by": "tandem-operator",
    }
    if spec.scheduling.queue_name:
        labels[LABEL_QUEUE] = spec.scheduling.queue_name
    return labels


def training_run(
    spec: TrainingJobSpec, namespace: str, job: str, attempt: int, resume_from: str | None
) -> TrainingRun:
    """The run document of one attempt: what every pod of the gang is told (see tandem.api.trainingrun)."""
    return TrainingRun(
        job_name=job,
        namespace=namespace,
        attempt=attempt,
        spec=spec,
        head_address=f"{head_service_name(job)}.{namespace}.svc:{RAY_GCS_PORT}",
        checkpoint_uri=checkpoint_uri(spec, namespace, job),
        resume_from=resume_from,
        data_root=DATASET_MOUNT,
        metrics_port=METRICS_PORT,
    )


def _env(run: TrainingRun) -> list[dict[str, Any]]:
    """The run document, and the pod's own name and namespace (it annotates itself with its progress)."""
    return [
        {"name": RUN_ENV, "value": run.to_env_value()},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]


def _volumes(spec: TrainingJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The writable dirs of the read-only root, the checkpoint claim (read-write, shared by every pod)
    and a pvc:// data set (read-only)."""
    volumes: list[dict[str, Any]] = [{"name": name, "emptyDir": {}} for name in WRITABLE_DIRS]
    mounts: list[dict[str, Any]] = [{"name": name, "mountPath": path} for name, path in WRITABLE_DIRS.items()]
    if spec.checkpoint is not None and spec.checkpoint.storage.pvc:
        volumes.append(
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.checkpoint.storage.pvc}}
        )
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
    claim = dataset_claim(spec)
    if claim:
        volumes.append({"name": "dataset", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "dataset", "mountPath": f"{DATASET_MOUNT}/{claim}", "readOnly": True})
    return volumes, mounts


def _pod(
    *,
    name: str,
    role: str,
    job: str,
    uid: str,
    namespace: str,
    spec: TrainingJobSpec,
    attempt: int,
    image: str,
    command: list[str],
    resources: dict[str, Any],
    gpus: int,
    resume_from: str | None,
    scheduler_name: str | None = None,
    extra_labels: dict[str, str] | None = None,
    spec_hash: str | None = None,
) -> dict[str, Any]:
    gang_size = spec.workers.replicas + 1
    tolerations: list[dict[str, Any]] = []
    node_selector: dict[str, str] = {}
    if role == "worker":
        tolerations = [t.to_dict() for t in spec.workers.tolerations or ()]
        node_selector = dict(spec.workers.node_selector or {})
        if spec.workers.gpu_product:
            node_selector[GPU_PRODUCT_LABEL] = spec.workers.gpu_product
    if gpus and GPU_TOLERATION not in tolerations:
        tolerations.append(dict(GPU_TOLERATION))
    pod_spec: dict[str, Any] = {
        "serviceAccountName": trainer_account(job),
        # Only the head talks to the API server (its progress annotation): workers get no token.
        "automountServiceAccountToken": role == "head",
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [
            {
                "name": role,
                "image": image,
                "command": command,
                "env": _env(training_run(spec, namespace, job, attempt, resume_from)),
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT}]
                + (
                    [
                        {"name": "gcs", "containerPort": RAY_GCS_PORT},
                        {"name": "dashboard", "containerPort": RAY_DASHBOARD_PORT},
                    ]
                    if role == "head"
                    else []
                ),
                "resources": resources,
                "securityContext": copy.deepcopy(CONTAINER_SECURITY),
                # A container that fails leaves its last log lines as its termination message: the
                # failure the operator records (lastFailure, the event) then says why, even once the
                # gang's pods, and their logs, are gone.
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "securityContext": copy.deepcopy(POD_SECURITY),
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if spec.scheduling.scheduler_name or scheduler_name:
        pod_spec["schedulerName"] = spec.scheduling.scheduler_name or scheduler_name
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name
    pod_spec["volumes"], pod_spec["containers"][0]["volumeMounts"] = _volumes(spec)
    labels = _labels(job, role, attempt, spec, spec_hash) | (extra_labels or {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                ANNOTATION_VOLCANO_GROUP: f"{job}-{attempt}",
                ANNOTATION_GANG_SIZE: str(gang_size),
            },
            "ownerReferences": [owner_reference(job, uid)],
        },
        "spec": pod_spec,
    }


def head_pod(
    spec: TrainingJobSpec,
    *,
    job: str,
    uid: str,
    namespace: str,
    attempt: int,
    image: str,
    resume_from: str | None,
    scheduler_name: str | None = None,
    spec_hash: str | None = None,
) -> dict[str, Any]:
    """The Ray head: runs the driver (`tandem train head`), reports progress on its own annotation.
    `spec_hash`: `pod_spec_hash(spec)` when the caller has it (computed here otherwise)."""
    head = spec.head.resources
    return _pod(
        name=head_pod_name(job, attempt),
        role="head",
        job=job,
        uid=uid,
        namespace=namespace,
        spec=spec,
        attempt=attempt,
        image=image,
        command=["tandem", "train", "head"],
        resources=_resources(head.cpu, head.memory, head.gpu),
        gpus=head.gpu,
        resume_from=resume_from,
        scheduler_name=scheduler_name,
        spec_hash=spec_hash,
    )


def worker_pod(
    spec: TrainingJobSpec,
    index: int,
    *,
    job: str,
    uid: str,
    namespace: str,
    attempt: int,
    image: str,
    resume_from: str | None = None,
    scheduler_name: str | None = None,
    spec_hash: str | None = None,
) -> dict[str, Any]:
    """One Ray worker (`tandem train worker`): joins the head and holds the GPUs the gang asked for.
    `spec_hash`: as for `head_pod`."""
    workers = spec.workers.resources
    return _pod(
        name=worker_pod_name(job, attempt, index),
        role="worker",
        job=job,
        uid=uid,
        namespace=namespace,
        spec=spec,
        attempt=attempt,
        image=image,
        command=["tandem", "train", "worker"],
        resources=_resources(workers.cpu, workers.memory, workers.gpu),
        gpus=workers.gpu,
        resume_from=resume_from,
        scheduler_name=scheduler_name,
        extra_labels={LABEL_INDEX: str(index)},
        spec_hash=spec_hash,
    )


def head_service(job: str, uid: str, namespace: str) -> dict[str, Any]:
    """Stable address of the current attempt's Ray head (GCS, dashboard, metrics).

    Headless (the name resolves straight to the head pod, no virtual IP to allocate) and without a
    selector: the operator publishes the head's address itself (`head_endpoints`), the moment the
    head has one. With a selector, the cluster's two endpoints controllers match every pod change in
    the namespace against every job's Service and write an Endpoints and an EndpointSlice each: at
    500 jobs in a namespace that was the largest cost Tandem added to the control plane (see
    docs/benchmarks.md). For the dashboard, port-forward to the head pod (`kubectl port-forward
    pod/JOB-N-head 8265`); a Service without a selector cannot be port-forwarded.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": head_service_name(job),
            "namespace": namespace,
            "labels": {LABEL_JOB: job, "app.kubernetes.io/managed-by": "tandem-operator"},
            "ownerReferences": [owner_reference(job, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "ports": [{"name": name, "port": port, "targetPort": port} for name, port in HEAD_PORTS.items()],
        },
    }


def head_endpoints(job: str, uid: str, namespace: str, head: str | None, ip: str | None) -> dict[str, Any]:
    """The head Service's one EndpointSlice: the head pod `head` at `ip`, or nobody (both None).

    Published as soon as the head has an IP, ready or not: workers start with the head and dial it
    at once (what `publishNotReadyAddresses` did for a Service with a selector).
    """
    endpoints = []
    if head is not None and ip is not None:
        endpoints.append(
            {
                "addresses": [ip],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": head, "namespace": namespace},
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": head_service_name(job),
            "namespace": namespace,
            "labels": {
                LABEL_JOB: job,
                "kubernetes.io/service-name": head_service_name(job),
                "endpointslice.kubernetes.io/managed-by": ENDPOINTS_MANAGER,
                "app.kubernetes.io/managed-by": "tandem-operator",
            },
            "ownerReferences": [owner_reference(job, uid)],
        },
        "addressType": "IPv6" if ip and ":" in ip else "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": name, "port": port, "protocol": "TCP"} for name, port in HEAD_PORTS.items()],
    }


def trainer_identity(job: str, uid: str, namespace: str, attempt: int) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding of one job's pods: `patch` on the current attempt's head
    pod, by name, and nothing else (the training driver writes its progress annotation onto its own
    pod; workers mount no token). Owned by the job; the Role is applied again for each new attempt.

    One identity per job, not per namespace: a namespace-wide Role to patch pods let any training
    container relabel or annotate every pod of the namespace (steal a Service's traffic, forge
    another job's progress).
    """
    account = trainer_account(job)
    meta = {
        "name": account,
        "namespace": namespace,
        "labels": {LABEL_JOB: job, "app.kubernetes.io/managed-by": "tandem-operator"},
        "ownerReferences": [owner_reference(job, uid)],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["pods"],
                    "resourceNames": [head_pod_name(job, attempt)],
                    "verbs": ["patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": trainer_account(job),
            },
            "subjects": [{"kind": "ServiceAccount", "name": trainer_account(job), "namespace": namespace}],
        },
    ]


def gang(
    spec: TrainingJobSpec,
    *,
    job: str,
    uid: str,
    namespace: str,
    attempt: int,
    image: str,
    resume_from: str | None,
    scheduler_name: str | None = None,
) -> list[dict[str, Any]]:
    """Every pod of one attempt: created together, scheduled together, deleted together.

    `scheduler_name`: the gang scheduler's profile (the operator's gangSchedulerName when gangScheduler
    is coscheduling), for pods whose spec names no scheduler of its own."""
    spec_hash = pod_spec_hash(spec)  # the same for every pod: hashed once (it dumps the whole spec)
    pods = [
        head_pod(
            spec,
            job=job,
            uid=uid,
            namespace=namespace,
            attempt=attempt,
            image=image,
            resume_from=resume_from,
            scheduler_name=scheduler_name,
            spec_hash=spec_hash,
        )
    ]
    pods += [
        worker_pod(
            spec,
            index,
            job=job,
            uid=uid,
            namespace=namespace,
            attempt=attempt,
            image=image,
            resume_from=resume_from,
            scheduler_name=scheduler_name,
            spec_hash=spec_hash,
        )
        for index in range(spec.workers.replicas)
    ]
    return pods


def network_policy(job: str, uid: str, namespace: str) -> dict[str, Any]:
    """The job's pods accept connections only from each other, on any port (Ray's GCS and dashboard,
    and the object manager, node manager and worker ports Ray picks at run time), plus the metrics port
    from anyone (Prometheus). Egress is left open (data sets, object storage, the API server).

    Per job, not per namespace: a static policy cannot tell one job's pods from another's, and
    NetworkPolicies add up, so a namespace-wide allow would open every job to every other."""
    own_pods = {"podSelector": {"matchLabels": {LABEL_JOB: job}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{job}-ray",
            "namespace": namespace,
            "labels": {LABEL_JOB: job, "app.kubernetes.io/managed-by": "tandem-operator"},
            "ownerReferences": [owner_reference(job, uid)],
        },
        "spec": {
            **own_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own_pods]},
                {"ports": [{"port": METRICS_PORT, "protocol": "TCP"}]},
            ],
        },
    }
