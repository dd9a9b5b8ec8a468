"""A model's whole life on the dev cluster's real node: train, crash, recover, serve, scale, cost.

`make demo` tells this story (tandem/demo.py) and tests/lifecycle asserts every step of it, with the
same functions: the images built from images/*.Dockerfile and imported into the real node's
containerd, the operator running as a pod from its image under the chart's ServiceAccount, a real
Prometheus scraping the pods, and `manifests/demo/` applied as a user would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tandem.devcluster import cluster as devcluster
from tandem.devcluster import images, realnode
from tandem.devinstall import REPO_ROOT, Kubectl, install_crds, install_example_volumes, install_operator_pod
from tandem.errors import UserError

Say = Callable[[str], None]

DEMO_MANIFESTS = REPO_ROOT / "manifests" / "demo"
TRAINING_MANIFEST = DEMO_MANIFESTS / "trainingjob.yaml"
SERVING_MANIFEST = DEMO_MANIFESTS / "inferenceservice.yaml"
NAMESPACE = "default"
JOB = "gpt-tiny"
SERVICE = "gpt-tiny"
CHECKPOINT_CLAIM = "tandem-checkpoints"
PROMETHEUS_PORT = 9090


@dataclass(frozen=True)
class Stack:
    """What the story runs against."""

    info: devcluster.ClusterInfo
    kubectl: Kubectl
    prometheus_url: str


def prepare(info: devcluster.ClusterInfo, say: Say) -> Stack:
    """Images built (or found cached) and imported, CRDs, a Prometheus, the operator as a pod, and the
    checkpoint volume: everything before the first `kubectl apply`."""
    node = realnode.load(info.state_dir)
    if node is None:
        raise UserError(
            f"cluster {info.name!r} has no real node: start it with `tandem cluster up --real-node`"
        )
    kubectl = Kubectl(str(info.bin_dir / "kubectl"), info.kubeconfig)
    say("building the images from images/*.Dockerfile (cached by their inputs) and importing them")
    images.load(info.name, images.IMAGES.values(), say)
    say("installing the CRDs (manifests/crds)")
    install_crds(kubectl)
    from tandem import devprometheus

    url = devprometheus.start(info.state_dir, info.kubeconfig, node.gateway, PROMETHEUS_PORT)
    say(f"Prometheus on {url}, scraping the cluster's annotated pods and training pods")
    say("starting the operator as a pod from its image, under the chart's ServiceAccount and RBAC")
    install_operator_pod(kubectl, images.OPERATOR.reference, {"prometheusUrl": url})
    say("creating the checkpoint volume the demo's TrainingJob and InferenceService share")
    install_example_volumes(kubectl, NAMESPACE, claims=(CHECKPOINT_CLAIM,))
    return Stack(info, kubectl, url)


def yaml_spec(manifest: Path) -> dict[str, Any]:
    """The spec of the (one) resource in `manifest`."""
    spec: dict[str, Any] = yaml.safe_load(manifest.read_text())["spec"]
    return spec


def apply(stack: Stack, manifest: Path) -> None:
    print(stack.kubectl.run("apply", "-n", NAMESPACE, "-f", str(manifest)), end="")


def get(stack: Stack, kind: str, name: str) -> dict[str, Any]:
    """The object as the API server has it ({} while it does not exist)."""
    out = stack.kubectl.run("get", kind, name, "-n", NAMESPACE, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else {}


def table(stack: Stack, kind: str, name: str) -> str:
    """`kubectl get KIND NAME` as a person sees it (the printer columns)."""
    return stack.kubectl.run("get", kind, name, "-n", NAMESPACE).rstrip()


def wait(what: str, condition: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    """Poll `condition` until truthy; a UserError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)  # the API server's state: polled, as `kubectl get -w` would show it
    raise UserError(f"timed out after {timeout:.0f}s waiting for {what}")


def follow(
    stack: Stack,
    kind: str,
    name: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
    say: Say | None = None,
) -> dict[str, Any]:
    """Print the object's `kubectl get` row each time it changes, until `done(object)`; returns it."""
    shown = ""
    deadline = time.monotonic() + timeout
    while True:
        obj = get(stack, kind, name)
        if say is not None:
            row = table(stack, kind, name).splitlines()[-1] if obj else ""
            if row and row.split()[1:-1] != shown.split()[1:-1]:  # AGE alone changing is no news
                say(row if shown else table(stack, kind, name))
                shown = row
        if obj and done(obj):
            return obj
        if time.monotonic() > deadline:
            raise UserError(
                f"timed out after {timeout:.0f}s following {kind} {name}: {table(stack, kind, name)}"
            )
        time.sleep(1.0)


def progress(job: dict[str, Any]) -> tuple[int, int | None]:
    """(step, newest checkpoint step) from a TrainingJob's status."""
    status = job.get("status") or {}
    step = (status.get("progress") or {}).get("step") or 0
    return int(step), (status.get("lastCheckpoint") or {}).get("step")


def worker_pods(stack: Stack, job: str) -> list[str]:
    out = stack.kubectl.run(
        "get", "pods", "-n", NAMESPACE, "-l", f"tandem.dev/trainingjob={job},tandem.dev/role=worker",
        "-o", "jsonpath={.items[*].metadata.name}",
    )  # fmt: skip
    return sorted(out.split())


def kill_worker(stack: Stack, job: str) -> str:
    """Delete one worker pod at once, as a node failure would: the gang must recover."""
    pod = worker_pods(stack, job)[-1]
    stack.kubectl.run("delete", "pod", pod, "-n", NAMESPACE, "--grace-period=0", "--force", "--wait=false")
    return pod


def service_url(stack: Stack, name: str) -> str:
    """The InferenceService's Service, as this machine reaches it (kube-proxy's ClusterIP rules)."""
    service = json.loads(stack.kubectl.run("get", "service", name, "-n", NAMESPACE, "-o", "json"))
    port = service["spec"]["ports"][0]["port"]
    return f"http://{service['spec']['clusterIP']}:{port}"


def complete(url: str, prompt: str, max_tokens: int, timeout: float = 60) -> dict[str, Any]:
    """One greedy `/v1/completions` request; the decoded reply."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        result: dict[str, Any] = json.loads(reply.read())
    return result


def start_load(url: str, seconds: int, concurrency: int, max_tokens: int = 24) -> subprocess.Popen[str]:
    """`hey` (Debian's HTTP load generator) sending completions for `seconds` from `concurrency`
    clients; the caller waits for it (`finish_load`)."""
    hey = shutil.which("hey")
    if hey is None:
        raise UserError("hey is not installed: run `make setup` (Debian's hey package)")
    body = json.dumps({"prompt": "The ", "max_tokens": max_tokens, "temperature": 0})
    argv = [hey, "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json"]
    argv += ["-d", body, f"{url}/v1/completions"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_load(load: subprocess.Popen[str]) -> dict[int, int]:
    """Wait for `hey`; its count of responses by HTTP status."""
    out, _ = load.communicate(timeout=600)
    codes: dict[int, int] = {}
    in_codes = False
    for line in out.splitlines():
        if line.startswith("Status code distribution"):
            in_codes = True
        elif in_codes and line.strip().startswith("["):
            code, _, count = line.strip().partition("]")
            codes[int(code.strip("["))] = int(count.split()[0])
        elif in_codes and line.strip():
            in_codes = False
    if load.returncode != 0:
        raise UserError(f"hey failed (exit {load.returncode}):\n{out[-2000:]}")
    return codes


def checkpoint_on_host(stack: Stack, path_in_pod: Path) -> Path:
    """Where a checkpoint the pods see under /checkpoints lies on this machine (the claim's hostPath)."""
    volume = json.loads(stack.kubectl.run("get", "pvc", CHECKPOINT_CLAIM, "-n", NAMESPACE, "-o", "json"))
    pv = json.loads(stack.kubectl.run("get", "pv", volume["spec"]["volumeName"], "-o", "json"))
    return Path(pv["spec"]["hostPath"]["path"]) / path_in_pod.relative_to("/checkpoints")


def prometheus_query(stack: Stack, expression: str) -> float | None:
    """One instant query's single value (None when the result is empty)."""
    url = f"{stack.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as reply:
        result = json.loads(reply.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def stop_everything(info: devcluster.ClusterInfo) -> None:
    """The story's own processes (Prometheus and its discovery loop); the cluster stops them otherwise."""
    from tandem import devprometheus

    devprometheus.stop(info.state_dir)
