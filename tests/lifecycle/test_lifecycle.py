"""A model's whole life on a real node, step by step: the story `make demo` tells, asserted.

Real pods from the project's own images: `tandem train head|worker` under Ray in the TrainingJob's
pods, `tandem serve` in the InferenceService's, the operator in its own pod; a real Prometheus feeds
the autoscaler. The one stand-in: the node's `nvidia.com/gpu` capacity is simulated (no GPU here), and
this story asks for none.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
import yaml

from tandem import lifecycle
from tandem.api.trainingrun import TrainingRun
from tandem.lifecycle import JOB, NAMESPACE, SERVICE, Stack
from tandem.operator.dashboards import layout
from tandem.operator.dashboards.expand import ALL, Context
from tandem.operator.dashboards.render import query_dashboard

SPEC = yaml.safe_load(lifecycle.TRAINING_MANIFEST.read_text())["spec"]
MAX_STEPS = SPEC["trainer"]["builtin"]["maxSteps"]
EVERY = SPEC["checkpoint"]["everySteps"]
TRAINING_SECONDS = 900
SERVING_SECONDS = 300
#: The operator's usage reader refreshes every 30 s over a 5-minute rate window.
USAGE_SECONDS = 180
PROMPT = "To be"


def head_pod(stack: Stack) -> dict[str, Any]:
    out = stack.kubectl.run(
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        f"tandem.dev/trainingjob={JOB},tandem.dev/role=head",
        "-o",
        "json",
    )
    pods = [p for p in json.loads(out)["items"] if p["status"].get("phase") == "Running"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in json.loads(out)["items"]]
    pod: dict[str, Any] = pods[0]
    return pod


def run_document(pod: dict[str, Any]) -> TrainingRun:
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
    return TrainingRun.from_env(env)


def local_greedy(checkpoint: Path, prompt: str, tokens: int) -> str:
    """The checkpoint's model run here, outside any server: what the served replica must answer."""
    from tandem.workloads.models.gpt import load_for_inference

    model, tokenizer, _ = load_for_inference(checkpoint)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, tokens, temperature=0, eos_id=tokenizer.eos_id)
    return tokenizer.decode(out[0, ids.size(1) :].tolist())


def trains_and_reports_through_its_pod(stack: Stack) -> None:
    """Training runs in real pods and reports through the head pod's own annotation; kubectl logs and
    exec work on its pods."""
    job = lifecycle.follow(stack, "tj", JOB, lambda j: lifecycle.progress(j)[1] is not None, TRAINING_SECONDS)
    head = head_pod(stack)
    annotation = json.loads(head["metadata"]["annotations"]["tandem.dev/progress"])
    assert annotation["step"] >= 1
    assert annotation["totalSteps"] == MAX_STEPS
    assert job["status"]["phase"] == "Running"
    assert job["status"]["workers"] == {"desired": 2, "ready": 2}
    assert run_document(head).spec.workers.replicas == 2
    name = head["metadata"]["name"]
    assert "workers joined" in stack.kubectl.run("logs", "-n", NAMESPACE, name)
    assert stack.kubectl.run("exec", "-n", NAMESPACE, name, "--", "tandem", "--version").startswith("tandem ")


def recovers_from_a_lost_worker(stack: Stack) -> None:
    """Half way a worker dies; the gang restarts from the newest checkpoint, losing at most one interval."""
    job = lifecycle.follow(
        stack, "tj", JOB, lambda j: lifecycle.progress(j)[0] >= MAX_STEPS // 2, TRAINING_SECONDS
    )
    step_at_kill, checkpoint_at_kill = lifecycle.progress(job)
    assert checkpoint_at_kill is not None
    killed = lifecycle.kill_worker(stack, JOB)
    job = lifecycle.follow(
        stack,
        "tj",
        JOB,
        lambda j: (j["status"].get("restarts") or 0) >= 1 and j["status"].get("phase") == "Running",
        TRAINING_SECONDS,
    )
    assert job["status"]["restarts"] == 1
    assert killed in job["status"]["lastFailure"]["message"]
    resumed = run_document(head_pod(stack))
    assert resumed.attempt >= 2
    assert resumed.resume_from is not None
    resume_step = int(resumed.resume_from.rstrip("/").rsplit("-", 1)[1])
    assert resume_step >= checkpoint_at_kill
    assert step_at_kill - resume_step <= EVERY, "more than one checkpoint interval of steps lost"


def completes(stack: Stack) -> dict[str, Any]:
    job = lifecycle.follow(
        stack, "tj", JOB, lambda j: j["status"].get("phase") == "Succeeded", TRAINING_SECONDS
    )
    assert lifecycle.progress(job) == (MAX_STEPS, MAX_STEPS)
    assert job["status"]["restarts"] == 1
    assert job["status"]["cost"]["usd"] > 0
    return job


def serves_the_checkpoint(stack: Stack, job: dict[str, Any]) -> str:
    """The InferenceService serves the job's last checkpoint and answers as that checkpoint's model."""
    lifecycle.apply(stack, lifecycle.SERVING_MANIFEST)
    service = lifecycle.follow(
        stack, "tisvc", SERVICE, lambda s: s.get("status", {}).get("phase") == "Ready", SERVING_SECONDS
    )
    assert service["status"]["model"]["trainingJob"] == JOB
    assert service["status"]["model"]["checkpointStep"] == MAX_STEPS
    url = lifecycle.service_url(stack, SERVICE)
    reply = lifecycle.complete(url, PROMPT, 16)
    in_pod = Path(job["status"]["lastCheckpoint"]["uri"].removeprefix("file://"))
    assert reply["choices"][0]["text"] == local_greedy(
        lifecycle.checkpoint_on_host(stack, in_pod), PROMPT, 16
    )
    return url


def scales_on_its_metrics(stack: Stack, url: str) -> None:
    """Load through the Service: the autoscaler, reading the replicas' metrics from Prometheus, adds one."""
    load = lifecycle.start_load(url, seconds=90, concurrency=8)
    try:
        lifecycle.follow(
            stack,
            "tisvc",
            SERVICE,
            lambda s: (s["status"].get("replicas") or {}).get("ready", 0) >= 2,
            SERVING_SECONDS,
        )
    finally:
        codes = lifecycle.finish_load(load)
    assert codes.get(200, 0) > 0, codes
    assert sum(n for code, n in codes.items() if code >= 500) == 0, codes
    scraped = lifecycle.prometheus_query(stack, f'count(tandem_serve_inflight_requests{{model="{SERVICE}"}})')
    assert scraped is not None
    assert scraped >= 1


def costs_both_phases(stack: Stack) -> None:
    """Both statuses show spend, and the serving replicas are charged max(request, measured usage): the
    real kubelet's cAdvisor series, scraped by the story's Prometheus, reach the operator's cost model."""
    service = lifecycle.get(stack, "tisvc", SERVICE)
    assert service["status"]["cost"]["usd"] > 0
    job = lifecycle.get(stack, "tj", JOB)
    assert job["status"]["cost"]["usd"] > 0
    assert job["status"]["costDisplay"].startswith("$")
    measured = f'sum(tandem_cost_containers{{namespace="{NAMESPACE}",name="{SERVICE}",basis="usage"}})'
    deadline = time.monotonic() + USAGE_SECONDS
    while (lifecycle.prometheus_query(stack, measured) or 0) < 1:
        assert time.monotonic() < deadline, (
            f"no serving container charged by measured usage within {USAGE_SECONDS}s: "
            f"{lifecycle.prometheus_query(stack, 'count(container_cpu_usage_seconds_total)')} cAdvisor series"
        )
        time.sleep(2)  # polling Prometheus: the operator re-reads usage every 30 s


#: Panels with nothing to show in this story, and why; each must indeed be empty (a panel that starts
#: answering here moves out of this table). Every other panel of the four dashboards must answer.
EMPTY_IN_THIS_STORY = {
    ("tandem-training", "mfu"): "no GPU: MFU is absent on a CPU",
    ("tandem-training", "gpu_utilization"): "no GPU",
    ("tandem-training", "gpu_memory"): "no GPU",
}
#: Panels that answer only when something goes wrong: may be empty, checked when not.
ONLY_ON_TROUBLE = {("tandem-serving-latency", "errors"), ("tandem-operator", "errors")}


def label_values(stack: Stack, variable: layout.Variable, chosen: dict[str, str]) -> set[str]:
    """A dashboard variable's choices as Grafana lists them: `label_values(metric{...}, label)`."""
    inner, _, label = variable.query.removeprefix("label_values(").removesuffix(")").rpartition(",")
    for name, value in chosen.items():
        inner = inner.replace(f"${name}", value)
    url = f"{stack.prometheus_url}/api/v1/label/{label.strip()}/values?" + urllib.parse.urlencode(
        {"match[]": inner}
    )
    with urllib.request.urlopen(url, timeout=10) as reply:
        return set(json.loads(reply.read())["data"])


def dashboards_show_the_story(stack: Stack, started: float) -> None:
    """Every panel of the four dashboards, its queries expanded as Grafana does, against the Prometheus
    that scraped the real pods: each variable offers the story's objects, each panel answers."""
    story = {"namespace": NAMESPACE, "service": SERVICE, "model": SERVICE, "job": JOB}
    problems: list[str] = []
    for board in layout.DASHBOARDS:
        chosen: dict[str, str] = {}
        for variable in board.variables:
            offered = label_values(stack, variable, chosen)
            chosen[variable.name] = story.get(variable.name) or min(offered, default="")
            if chosen[variable.name] not in offered:
                problems.append(f"{board.uid}: ${variable.name} offers {sorted(offered)} ({variable.query})")
        context = Context(
            start=started,
            end=time.time(),
            scrape_interval=2.0,
            max_data_points=300,
            variables={**chosen, **{k: ALL for k in ("model",) if k not in chosen}},
        )
        for key, data in query_dashboard(stack.prometheus_url, board, context).items():
            # The objective's line (the SLO recording rule) is drawn whatever happened: not a measurement.
            measured = [line.legend for line in data.lines if line.points and "SLO" not in line.legend]
            if (board.uid, key) in EMPTY_IN_THIS_STORY:
                if measured:
                    problems.append(f"{board.uid}/{key} answers now ({measured}): drop it from the table")
            elif not measured and (board.uid, key) not in ONLY_ON_TROUBLE:
                problems.append(f"{board.uid}/{key} has no data: {data.exprs}")
    assert problems == [], "\n".join(problems)


def test_a_model_trains_crashes_recovers_serves_scales_and_costs(stack: Stack, say: lifecycle.Say) -> None:
    started = time.time()
    lifecycle.apply(stack, lifecycle.TRAINING_MANIFEST)
    say(f"applied TrainingJob {JOB}: waiting for its pods to report progress")
    trains_and_reports_through_its_pod(stack)
    say("training reports through its head pod; waiting for half way to kill a worker")
    recovers_from_a_lost_worker(stack)
    say("recovered from the lost worker; waiting for the job to complete")
    job = completes(stack)
    say(f"completed; serving its checkpoint through InferenceService {SERVICE}")
    url = serves_the_checkpoint(stack, job)
    say("served the checkpoint's answer; loading it until the autoscaler adds a replica")
    scales_on_its_metrics(stack, url)
    costs_both_phases(stack)
    say("scaled, cost in both statuses; querying every dashboard panel")
    dashboards_show_the_story(stack, started)
