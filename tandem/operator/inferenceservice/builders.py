"""InferenceService -> child manifests, as pure functions (golden-tested without a cluster).

Children, all named after the service and owned by it: a Deployment of model-server replicas
(`tandem serve`), a Service in front of them (port 80 -> 8080), a PodDisruptionBudget, and a
ServiceMonitor where the Prometheus Operator's CRD exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Final

from tandem.api.common import API_VERSION
from tandem.api.inferenceservice import KIND, InferenceServiceSpec
from tandem.api.options import to_options
from tandem.api.serving import HTTP_PORT, HttpSettings, ModelSettings, ServerOptions, default_of
from tandem.operator.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE, GPU_TOLERATION

#: Label every replica pod carries; `status.selector` (the scale subresource's selector) is built on it.
SERVICE_LABEL = "tandem.dev/inferenceservice"
#: Hash of the Deployment the operator last applied: equal hashes mean nothing to apply.
ANNOTATION_SPEC_HASH = "tandem.dev/spec-hash"
#: The model a Deployment serves (lineage), read back to know what the replicas run.
ANNOTATION_MODEL_URI = "tandem.dev/model-uri"
ANNOTATION_TRAINING_JOB = "tandem.dev/training-job"
ANNOTATION_CHECKPOINT_STEP = "tandem.dev/checkpoint-step"
ANNOTATION_CHECKPOINT_CLAIM = "tandem.dev/checkpoint-claim"
#: Hash of the spec fields that choose the model (rollout `manual` keeps a checkpoint until it changes).
ANNOTATION_MODEL_SPEC_HASH = "tandem.dev/model-spec-hash"

SERVICE_PORT = 80
MODEL_MOUNT = "/models"
#: Where a TrainingJob's checkpoint claim is mounted, as in the training pods (same `file://` URIs).
CHECKPOINT_MOUNT = "/checkpoints"
#: Where an `s3://` model is downloaded (an emptyDir per replica; `tandem serve --model-cache-dir`).
MODEL_CACHE_MOUNT = "/model-cache"
#: How long an `s3://` model may take to download before the replica is restarted: the startup probe
#: allows this long for the port to open (the server downloads before it listens).
MODEL_DOWNLOAD_SECONDS = 1800
STARTUP_PROBE_PERIOD = 5
#: The server finishes accepted requests for this long after SIGTERM (`tandem serve --drain-timeout-s`).
DRAIN_SECONDS: Final[float] = default_of(HttpSettings, "drain_timeout_s")
#: Drain plus time for endpoints to drop the pod and for the process to exit.
TERMINATION_GRACE_SECONDS = math.ceil(DRAIN_SECONDS) + 15
#: Pod Security "restricted" for every replica: the image's user, which must not be root (the
#: project's workloads image runs as 65532, numerically so the kubelet can check), and the runtime's
#: default seccomp profile.
POD_SECURITY: Final[dict[str, Any]] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
#: No privilege escalation, no capabilities, and a read-only root file system: what the server writes
#: goes to WRITABLE_DIRS (or to the s3:// model cache at MODEL_CACHE_MOUNT).
CONTAINER_SECURITY: Final[dict[str, Any]] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}
#: The workloads image's HOME and working directory (images/workloads.Dockerfile), as in the training pods.
HOME_DIR = "/home/tandem"
#: The writable places of a replica under its read-only root, one emptyDir each (they live as long as
#: the pod, on the node's disk): /tmp holds the server's run directory (the workers' sockets and
#: scoreboard, `tandem serve` makes it with tempfile) and torch.compile's inductor cache; HOME takes
#: ~/.cache (Triton's kernels, torch's hub, Hugging Face's cache, and the default model cache of a
#: server started without --model-cache-dir). /dev/shm is the runtime's own tmpfs and stays writable.
#: An image built on another base must keep that HOME: no HOME variable is set.
WRITABLE_DIRS: Final[dict[str, str]] = {"tmp": "/tmp", "home": HOME_DIR}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


@dataclass(frozen=True)
class ModelTarget:
    """The model the replicas should load: a URI as the server sees it, and its lineage."""

    uri: str
    training_job: str | None = None
    checkpoint_step: int | None = None
    #: A claim to mount read-only at CHECKPOINT_MOUNT (a TrainingJob's checkpoint PVC).
    checkpoint_claim: str | None = None


@dataclass(frozen=True)
class Service:
    """The InferenceService being built: identity, validated spec, image."""

    name: str
    namespace: str
    uid: str
    spec: InferenceServiceSpec
    image: str


def labels(name: str) -> dict[str, str]:
    return {
        SERVICE_LABEL: name,
        "app.kubernetes.io/name": "tandem-serving",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/managed-by": "tandem-operator",
    }


def selector(name: str) -> str:
    """`status.selector`: the label selector of the replica pods, as a string."""
    return f"{SERVICE_LABEL}={name}"


def url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc"


def pvc_model(uri: str) -> tuple[str, str] | None:
    """(claim, path inside it) of a `pvc://claim/path` model, else None."""
    if not uri.startswith("pvc://"):
        return None
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, path


def s3_model(uri: str) -> bool:
    """True for an `s3://` model, which each replica downloads into its model cache."""
    return uri.startswith("s3://")


def server_uri(uri: str) -> str:
    """The `--model-uri` the server gets: a `pvc://` model as the path where its claim is mounted."""
    claim = pvc_model(uri)
    if claim is None:
        return uri
    name, path = claim
    return f"file://{MODEL_MOUNT}/{name}/{path}".rstrip("/")


def model_spec_hash(spec: InferenceServiceSpec) -> str:
    """Hash of the spec fields that decide which model is served (not scaling, suspend or batching)."""
    shaping = {
        "model": spec.model.to_dict(),
        "runtime": spec.runtime.value,
        "precision": spec.precision.value,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def replicas(spec: InferenceServiceSpec) -> int:
    """Replicas to run: 0 when suspended, else the requested count clamped to [min, max]."""
    return 0 if spec.suspend else spec.replicas.clamp()


def _resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    amounts: dict[str, Any] = {}
    if spec.resources.cpu is not None:
        amounts["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory is not None:
        amounts["memory"] = str(spec.resources.memory)
    if spec.resources.gpu:
        amounts[GPU_RESOURCE] = str(spec.resources.gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def server_options(service: Service, model: ModelTarget) -> ServerOptions:
    """What a replica's `tandem serve` runs with: the service's runtime, precision and batching, the
    model where the pod finds it, and the pod's listening address."""
    spec = service.spec
    return ServerOptions(
        model=ModelSettings(
            model_uri=server_uri(model.uri),
            runtime=spec.runtime,
            model_name=service.name,
            model_cache_dir=MODEL_CACHE_MOUNT if s3_model(model.uri) else None,
            precision=spec.precision,
        ),
        batching=spec.batching,
        http=HttpSettings(host="0.0.0.0", port=HTTP_PORT, drain_timeout_s=DRAIN_SECONDS),
    )


def server_command(service: Service, model: ModelTarget) -> list[str]:
    """`tandem serve` and its options (those that differ from the server's defaults, the same model's)."""
    return ["tandem", "serve", *to_options(server_options(service, model))]


def _volumes(model: ModelTarget) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The writable dirs of the read-only root, then the model's claim or cache (read-only claims)."""
    volumes: list[dict[str, Any]] = [{"name": name, "emptyDir": {}} for name in WRITABLE_DIRS]
    mounts: list[dict[str, Any]] = [{"name": name, "mountPath": path} for name, path in WRITABLE_DIRS.items()]
    claim = pvc_model(model.uri)
    if claim is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim[0], "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{MODEL_MOUNT}/{claim[0]}", "readOnly": True})
    if model.checkpoint_claim:
        volumes.append(
            {
                "name": "checkpoints",
                "persistentVolumeClaim": {"claimName": model.checkpoint_claim, "readOnly": True},
            }
        )
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT, "readOnly": True})
    if s3_model(model.uri):
        volumes.append({"name": "model-cache", "emptyDir": {}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
    return volumes, mounts


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _model_annotations(model: ModelTarget, spec: InferenceServiceSpec) -> dict[str, str]:
    annotations = {ANNOTATION_MODEL_URI: model.uri, ANNOTATION_MODEL_SPEC_HASH: model_spec_hash(spec)}
    if model.training_job:
        annotations[ANNOTATION_TRAINING_JOB] = model.training_job
    if model.checkpoint_step is not None:
        annotations[ANNOTATION_CHECKPOINT_STEP] = str(model.checkpoint_step)
    if model.checkpoint_claim:
        annotations[ANNOTATION_CHECKPOINT_CLAIM] = model.checkpoint_claim
    return annotations


def deployment(service: Service, model: ModelTarget, replica_count: int) -> dict[str, Any]:
    """The model-server replicas. Rolling updates add a replica before removing one (no capacity dip)."""
    spec = service.spec
    name = service.name
    pod_labels = labels(name)
    tolerations = [t.to_dict() for t in spec.tolerations or ()]
    if spec.resources.gpu and GPU_TOLERATION not in tolerations:
        tolerations.append(dict(GPU_TOLERATION))
    node_selector = dict(spec.node_selector or {})
    if spec.gpu_product:
        node_selector[GPU_PRODUCT_LABEL] = spec.gpu_product
    container: dict[str, Any] = {
        "name": "server",
        "image": service.image,
        "command": server_command(service, model),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        # The port opens before the model loads: liveness answers during a long load, readiness after it.
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=6),
        "resources": _resources(spec),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
        "securityContext": copy.deepcopy(POD_SECURITY),
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": topology_key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {SERVICE_LABEL: name}},
            }
            for topology_key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
        ],
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if s3_model(model.uri):
        # The server downloads the model before it listens: liveness and readiness wait for this probe.
        container["startupProbe"] = _probe(
            "/v2/health/live",
            period=STARTUP_PROBE_PERIOD,
            failures=MODEL_DOWNLOAD_SECONDS // STARTUP_PROBE_PERIOD,
        )
        if spec.model.credentials_secret:
            container["envFrom"] = [{"secretRef": {"name": spec.model.credentials_secret}}]
    pod_spec["volumes"], container["volumeMounts"] = _volumes(model)
    manifest: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            **child_metadata(name, service.uid, service.namespace),
            "annotations": _model_annotations(model, spec),
        },
        "spec": {
            "replicas": replica_count,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": {SERVICE_LABEL: name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        **_model_annotations(model, spec),
                        # For a Prometheus that discovers pods by annotation (no Prometheus Operator).
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(HTTP_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    manifest["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = manifest_hash(manifest)
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Hash of a manifest without its own hash annotation: the operator applies only when it changes."""
    body = json.loads(json.dumps(manifest))
    body["metadata"].get("annotations", {}).pop(ANNOTATION_SPEC_HASH, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def child_metadata(name: str, uid: str, namespace: str) -> dict[str, Any]:
    """Name, labels and owner of a child that is named after its InferenceService."""
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(name),
        "ownerReferences": [owner_reference(name, uid)],
    }


def service(name: str, uid: str, namespace: str) -> dict[str, Any]:
    """The stable address `http://NAME.NAMESPACE.svc` (port 80) in front of the ready replicas."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(name, uid, namespace),
        "spec": {
            "selector": {SERVICE_LABEL: name},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(name: str, uid: str, namespace: str) -> dict[str, Any]:
    """Voluntary evictions (node drains) take one replica at a time; a single replica may still move."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(name, uid, namespace),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {SERVICE_LABEL: name}}},
    }


def service_monitor(name: str, uid: str, namespace: str) -> dict[str, Any]:
    """Prometheus Operator scrape config for the replicas' /metrics (only where its CRD exists)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": child_metadata(name, uid, namespace),
        "spec": {
            "selector": {"matchLabels": {SERVICE_LABEL: name}},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "5s"}],
        },
    }


def children(service_: Service, with_service_monitor: bool) -> list[dict[str, Any]]:
    """The children created once and left alone (create-if-absent): Service, PDB, ServiceMonitor."""
    made = [
        service(service_.name, service_.uid, service_.namespace),
        pod_disruption_budget(service_.name, service_.uid, service_.namespace),
    ]
    if with_service_monitor:
        made.append(service_monitor(service_.name, service_.uid, service_.namespace))
    return made
