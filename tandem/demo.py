"""`make demo`: a model's whole life on a local cluster with a real node, told step by step.

A real node (kubelet, containerd, runc) joins the local control plane; the images are built from
images/*.Dockerfile and imported; the operator runs as a pod from its image. A TrainingJob trains a
small GPT on two CPU workers while `kubectl get tj` shows it move; half way the demo kills a worker and
the job resumes from its checkpoint; an InferenceService then serves that checkpoint, a load
generator drives it and the autoscaler adds a replica from the replicas' metrics in a real Prometheus;
the cost of both phases is shown. The steps are `tandem.lifecycle`'s, which tests/lifecycle asserts.
`make demo-down` (`python -m tandem.demo --down`) stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tandem import devprometheus, lifecycle
from tandem.devcluster import cluster as devcluster
from tandem.devcluster import processes
from tandem.devinstall import REPO_ROOT
from tandem.errors import UserError

DEMO_CLUSTER = "tandem"
TRAINING_SECONDS = 1200
SERVING_SECONDS = 600


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _show(rows: str) -> None:
    for row in rows.splitlines():
        print(f"    {row}", flush=True)


def up() -> int:
    _say(
        "starting the local cluster: control plane, a real node (kubelet, containerd, runc), "
        "simulated GPU nodes"
    )
    info = devcluster.up(DEMO_CLUSTER, progress=_say, real_node=True, cpu_nodes=0)
    stack = lifecycle.prepare(info, _say)
    spec = lifecycle.yaml_spec(lifecycle.TRAINING_MANIFEST)
    total = spec["trainer"]["builtin"]["maxSteps"]

    _say(f"1/6 training: kubectl apply -f {lifecycle.TRAINING_MANIFEST.relative_to(REPO_ROOT)}")
    lifecycle.apply(stack, lifecycle.TRAINING_MANIFEST)
    lifecycle.follow(
        stack, "tj", lifecycle.JOB, lambda j: lifecycle.progress(j)[0] >= total // 2, TRAINING_SECONDS, _show
    )
    killed = lifecycle.kill_worker(stack, lifecycle.JOB)
    _say(f"2/6 half way: worker pod {killed} killed; the job resumes from its newest checkpoint")
    lifecycle.follow(
        stack,
        "tj",
        lifecycle.JOB,
        lambda j: j["status"].get("phase") == "Succeeded",
        TRAINING_SECONDS,
        _show,
    )
    _say("3/6 training done (RESTARTS 1): serving its last checkpoint")
    lifecycle.apply(stack, lifecycle.SERVING_MANIFEST)
    lifecycle.follow(
        stack,
        "tisvc",
        lifecycle.SERVICE,
        lambda s: (s.get("status") or {}).get("phase") == "Ready",
        SERVING_SECONDS,
        _show,
    )
    url = lifecycle.service_url(stack, lifecycle.SERVICE)
    reply = lifecycle.complete(url, "To be", 24)
    _say(f"4/6 POST {url}/v1/completions 'To be' -> {reply['choices'][0]['text']!r}")
    _say("5/6 load: hey, 8 clients for 90 s; the autoscaler adds a replica on in-flight requests")
    load = lifecycle.start_load(url, seconds=90, concurrency=8)
    try:
        lifecycle.follow(
            stack,
            "tisvc",
            lifecycle.SERVICE,
            lambda s: ((s.get("status") or {}).get("replicas") or {}).get("ready", 0) >= 2,
            SERVING_SECONDS,
            _show,
        )
    finally:
        codes = lifecycle.finish_load(load)
    _say(f"   load done: responses by status {codes}")
    _say("6/6 cost of both phases (COST: training so far; COST/H: serving now)")
    print(stack.kubectl.run("get", "tj,tisvc", "-n", lifecycle.NAMESPACE))
    print(
        "Look around:\n"
        f"  export KUBECONFIG={info.kubeconfig}\n"
        f"  export PATH={info.bin_dir}:$PATH   # the pinned kubectl\n"
        "  kubectl get tj,tisvc,pods -o wide\n"
        "  kubectl describe tj gpt-tiny\n"
        f"  kubectl logs -n {lifecycle.NAMESPACE} -l tandem.dev/inferenceservice=gpt-tiny\n"
        f"  Prometheus: {stack.prometheus_url} (try tandem_serve_request_duration_seconds_count)\n"
        f"  tandem cost --prometheus-url {stack.prometheus_url}\n"
        "  dashboards: charts/tandem/dashboards/*.json (docs/dashboards.md)\n"
        "Stop everything with `make demo-down`."
    )
    return 0


def operators_of(state_dir: Path) -> list[processes.ProcessRecord]:
    """Every operator process bound to the cluster whose state is in `state_dir`: the one the demo
    started, and any a person started by hand (`tandem operator run`, `python -m tandem.operator`)
    with a KUBECONFIG from that folder, as docs/devcluster.md shows."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not _is_operator(argv):
            continue
        kubeconfig = next((v[len(b"KUBECONFIG=") :] for v in environ if v.startswith(b"KUBECONFIG=")), b"")
        path = Path(kubeconfig.decode(errors="replace"))
        if kubeconfig and path.resolve().is_relative_to(state_dir.resolve()):
            found.append(processes.ProcessRecord("operator", int(entry.name), argv, ""))
    return found


def _is_operator(argv: list[str]) -> bool:
    """`python -m tandem.operator ...` or `tandem operator run ...` (any interpreter, any path)."""
    if "-m" in argv and "tandem.operator" in argv:
        return True
    words = [Path(a).name for a in argv[:4]]
    return "tandem" in words and words[words.index("tandem") + 1 : words.index("tandem") + 3] == [
        "operator",
        "run",
    ]


def _stop(found: list[processes.ProcessRecord], grace: float = 10.0) -> list[processes.ProcessRecord]:
    """SIGTERM each process (not its group: one started by hand may share its shell's), SIGKILL after
    `grace` seconds; returns those still alive."""
    for record in found:
        with contextlib.suppress(OSError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (alive := [r for r in found if processes.is_running(r)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for record in alive:
        with contextlib.suppress(OSError):
            os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (alive := [r for r in alive if processes.is_running(r)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def down() -> int:
    state_dir = devcluster.status(DEMO_CLUSTER).state_dir
    operators = operators_of(state_dir)
    if operators:
        left = _stop(operators)
        pids = ", ".join(str(r.pid) for r in operators)
        _say(f"operator stopped (pid {pids})" if not left else f"could not stop operator pid {left[0].pid}")
    else:
        _say("no operator process of the demo cluster ran on this machine (its pod stops with the cluster)")
    if devprometheus.stop(state_dir):
        _say("Prometheus stopped")
    stopped = devcluster.down(DEMO_CLUSTER, progress=_say)
    _say("cluster stopped" if stopped else "no demo cluster was running")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.demo", description=__doc__)
    parser.add_argument("--down", action="store_true", help="stop the demo operator and cluster")
    args = parser.parse_args(argv)
    try:
        return down() if args.down else up()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
