"""TrainingJob at scale: N jobs of W workers against the floor of creating the same pods directly.

Runs on a real control plane (`tandem-bench` dev cluster, kwok nodes), in one process, side by side,
as `--repeats` alternating rounds (the machine is noisy; compare ratios, not seconds):
  floor  - a plain script writes, with the same client concurrency, what the operator must write for
           each job, and waits (a watch) until all pods are Running. Two floors (`--floor`):
           `children` (default): every child the operator makes per job, from its own builders and in
           its order (ServiceAccount, Role, RoleBinding, then the W+1 pods under that account, the head
           Service and its EndpointSlice), owners left out; `pods`: the pods alone, without an
           account (the floor of the rounds before 2026-12-06, which the per-job identity outgrew);
  tandem - the same number of TrainingJobs are applied and the real operator (a separate process,
           under the chart's RBAC) creates the children; we wait until all pods are Running.
What Tandem writes beyond the `children` floor is its contract: the TrainingJob itself, its status
and its events. Each namespace is emptied before the next phase. Prints a table per round and the
median: time to all-Running, the ratio to each floor, operator peak RSS and CPU seconds (from the
moment it is healthy), reconcile latency p50/p99 from the operator's own histogram; then, for the last
round, the API writes per job, the control plane's CPU seconds, and when the pods were created and
started. `--profile` samples the operator with py-spy in the last Tandem phase and prints where its
CPU went.

    .venv/bin/python bench/trainingjob_scale.py --jobs 500 --workers 4 --repeats 3
    .venv/bin/python bench/trainingjob_scale.py --jobs 2000 --repeats 2 --floor both --profile
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from operator_process import start_operator  # noqa: E402

from tandem.api.trainingjob import TrainingJobSpec  # noqa: E402
from tandem.devcluster import cluster as devcluster  # noqa: E402
from tandem.devinstall import Kubectl, install_crds, operator_kubeconfig  # noqa: E402
from tandem.operator.trainingjob import builders  # noqa: E402

CLUSTER = "tandem-bench"
PODS_PER_NODE = 250
FLOORS = ("children", "pods")


def finish(reply: Any) -> bytes:
    """Read a raw reply of the generated client (`_preload_content=False`) and give its connection
    back to the pool (left alone, every call would open a new TLS connection)."""
    try:
        data: bytes = reply.data
        return data
    finally:
        reply.release_conn()


def job_spec(workers: int) -> dict[str, Any]:
    return {
        "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///data/corpus.txt"}}},
        "workers": {"replicas": workers},
        "batch": {"perDevice": 4},
        "scheduling": {"gangTimeoutSeconds": 600},
    }


def clients(kubeconfig: Path) -> tuple[Any, Any]:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    api.configuration.connection_pool_maxsize = 32
    return client.CoreV1Api(api), client.CustomObjectsApi(api)


def wait_all_running(core: Any, namespace: str, expected: int, started: float, timeout: float) -> float:
    """Seconds from `started` until `expected` pods in the namespace are Running.

    Watches rather than polls: listing 2,500 pods twice a second costs the API server and this
    process several CPU seconds, on the same two cores, more the longer a run takes.
    """
    listed = json.loads(finish(core.list_namespaced_pod(namespace, _preload_content=False)))
    running = {p["metadata"]["uid"] for p in listed["items"] if _phase(p) == "Running"}
    version = listed["metadata"]["resourceVersion"]
    while len(running) < expected:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            raise SystemExit(f"timed out: {len(running)}/{expected} pods Running in {namespace}")
        stream = core.list_namespaced_pod(
            namespace,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(int(left), 1),
            _preload_content=False,
        )
        try:
            for line in stream:
                event = json.loads(line)
                pod = event["object"]
                version = pod["metadata"]["resourceVersion"]
                if event["type"] == "ERROR":
                    raise SystemExit(f"pod watch failed: {pod.get('message')}")
                if event["type"] != "BOOKMARK" and _phase(pod) == "Running" and event["type"] != "DELETED":
                    running.add(pod["metadata"]["uid"])
                    if len(running) >= expected:
                        break
        finally:
            stream.release_conn()
    return time.monotonic() - started


def _phase(pod: dict[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _ownerless(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"].pop("ownerReferences", None)
    return manifest


def floor_writes(kind: str, spec: TrainingJobSpec, namespace: str, job: str) -> list[list[dict[str, Any]]]:
    """What a plain script writes for one job, in steps (each step's objects in order): `children`,
    the operator's own children of the job from its builders (its identity first: admission refuses
    a pod whose ServiceAccount does not exist yet); `pods`, the pods alone without an account."""
    pods = builders.gang(
        spec, job=job, uid="none", namespace=namespace, attempt=1, image="img", resume_from=None
    )
    if kind == "pods":
        for pod in pods:
            pod["spec"].pop("serviceAccountName")
        return [[_ownerless(pod) for pod in pods]]
    identity = builders.trainer_identity(job, "none", namespace, attempt=1)
    head = [
        builders.head_service(job, "none", namespace),
        builders.head_endpoints(job, "none", namespace, None, None),  # one write, as the operator's
    ]
    return [[_ownerless(m) for m in identity], [_ownerless(m) for m in pods + head]]


def creators(api: Any) -> dict[str, Callable[..., Any]]:
    """The generated client's create call for each kind the floor writes."""
    from kubernetes import client

    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    return {
        "Pod": core.create_namespaced_pod,
        "ServiceAccount": core.create_namespaced_service_account,
        "Service": core.create_namespaced_service,
        "Role": rbac.create_namespaced_role,
        "RoleBinding": rbac.create_namespaced_role_binding,
        "EndpointSlice": client.DiscoveryV1Api(api).create_namespaced_endpoint_slice,
    }


def run_floor(core: Any, kind: str, namespace: str, jobs: int, workers: int, concurrency: int) -> float:
    spec = TrainingJobSpec.model_validate(job_spec(workers))
    writes = [floor_writes(kind, spec, namespace, f"j{j}") for j in range(jobs)]
    pods = sum(1 for steps in writes for step in steps for m in step if m["kind"] == "Pod")

    calls = creators(core.api_client)

    def one_job(steps: list[list[dict[str, Any]]]) -> None:
        for step in steps:
            for manifest in step:  # the raw reply, read and released
                finish(calls[manifest["kind"]](namespace, manifest, _preload_content=False))

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one_job, writes))
    return wait_all_running(core, namespace, pods, started, timeout=1800)


def run_tandem(core: Any, custom: Any, namespace: str, jobs: int, workers: int, concurrency: int) -> float:
    def create(j: int) -> None:
        body = {
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": f"j{j}"},
            "spec": job_spec(workers),
        }
        finish(
            custom.create_namespaced_custom_object(
                "tandem.dev", "v1alpha1", namespace, "trainingjobs", body, _preload_content=False
            )
        )

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(create, range(jobs)))
    print(f"  {jobs} TrainingJobs created in {time.monotonic() - started:.1f} s", flush=True)
    return wait_all_running(core, namespace, jobs * (workers + 1), started, timeout=1800)


def timeline(core: Any, namespace: str) -> str:
    """When the pods were created and started, in seconds after the first one was created (p50/p90/max).

    Kubernetes timestamps have one-second resolution: this says which stage lags, not by how many ms.
    """
    from datetime import datetime

    def stamp(text: str | None) -> float | None:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None

    items = json.loads(finish(core.list_namespaced_pod(namespace, _preload_content=False)))["items"]
    created = sorted(t for p in items if (t := stamp(p["metadata"].get("creationTimestamp"))) is not None)
    started = sorted(t for p in items if (t := stamp((p.get("status") or {}).get("startTime"))) is not None)
    if not created or not started:
        return "no pods"
    origin = created[0]

    def spread(times: list[float]) -> str:
        pick = [times[int(q * (len(times) - 1))] - origin for q in (0.5, 0.9, 1.0)]
        return " / ".join(f"{t:.0f}" for t in pick)

    return f"pods created at {spread(created)} s, started at {spread(started)} s (p50 / p90 / last)"


def quantile(histogram: list[tuple[float, float]], q: float) -> float:
    """Quantile from cumulative (upper bound, count) buckets, interpolated linearly within a bucket."""
    total = histogram[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in histogram:
        if count >= rank:
            if bound == float("inf"):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 0)
        lower, below = bound, count
    return lower


def reconcile_histogram(metrics: str, kind: str) -> list[tuple[float, float]]:
    buckets = []
    for line in metrics.splitlines():
        if line.startswith("tandem_operator_reconcile_duration_seconds_bucket") and f'kind="{kind}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(buckets)


def request_counts(kubectl: Kubectl) -> dict[tuple[str, str], float]:
    """The API server's request counter by (verb, resource), summed over codes and scopes."""
    counts: dict[tuple[str, str], float] = {}
    for line in kubectl.run("get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        key = (labels.get("verb", ""), labels.get("resource", "") + "/" + labels.get("subresource", ""))
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def request_delta(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], jobs: int
) -> list[str]:
    """Table rows of the write requests made between two snapshots, per job."""
    rows = []
    for key in sorted(after):
        verb, resource = key
        delta = after[key] - before.get(key, 0.0)
        if verb in ("POST", "PATCH", "PUT", "DELETE", "APPLY") and delta >= jobs / 10:
            rows.append(f"| {verb} {resource.rstrip('/')} | {delta:.0f} | {delta / jobs:.2f} |")
    return rows


CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def control_plane_cpu(cluster: str) -> dict[str, float]:
    """CPU seconds used so far by each control-plane program of `cluster` (its processes name the
    cluster's state folder on their command line; other clusters on the machine are left out)."""
    used = dict.fromkeys(CONTROL_PLANE, 0.0)
    mark = f"/clusters/{cluster}/".encode()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, rest = stat.read_text().rsplit(")", 1)
            if mark not in (stat.parent / "cmdline").read_bytes():
                continue
        except OSError:
            continue
        name = head.split("(", 1)[1]
        name = next((program for program in CONTROL_PLANE if program[:15] == name), name)  # comm: 15 chars
        if name in used:
            fields = rest.split()
            used[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"{name} {after[name] - before[name]:.0f} s" for name in CONTROL_PLANE)


def loop_thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread: the operator's asyncio loop (kopf, the work queue);
    the reconciles, their child calls and the watches run in other threads."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(peak RSS in MB, user CPU seconds, system CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return peak_kb / 1024, int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class Run:
    """One measured phase: time to all-Running and what the control plane did meanwhile."""

    seconds: float
    control_plane_cpu: str
    writes: list[str]
    timeline: str
    operator_rss: float = 0.0
    operator_cpu: float = 0.0
    #: Of operator_cpu, the main thread's (the asyncio loop).
    operator_loop_cpu: float = 0.0
    histogram: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Bench:
    kubectl: Kubectl
    core: Any
    custom: Any
    workdir: Path
    jobs: int
    workers: int
    concurrency: int
    cluster: str

    def measure(self, namespace: str, create_and_wait: Callable[[], float]) -> Run:
        before, cpu_before = request_counts(self.kubectl), control_plane_cpu(self.cluster)
        seconds = create_and_wait()
        return Run(
            seconds=seconds,
            control_plane_cpu=cpu_delta(cpu_before, control_plane_cpu(self.cluster)),
            writes=request_delta(before, request_counts(self.kubectl), self.jobs),
            timeline=timeline(self.core, namespace),
        )

    def fresh(self, namespace: str) -> None:
        """Create the phase's namespace, after removing one left by an interrupted run."""
        self.kubectl.run("delete", "namespace", namespace, "--ignore-not-found", "--timeout=900s")
        self.kubectl.run("create", "namespace", namespace)

    def floor(self, kind: str, namespace: str) -> Run:
        self.fresh(namespace)
        run = self.measure(
            namespace,
            lambda: run_floor(self.core, kind, namespace, self.jobs, self.workers, self.concurrency),
        )
        self.clear(namespace)
        return run

    def clear(self, namespace: str) -> None:
        """Delete the namespace and wait until it is gone, its pods removed at once (grace 0): the
        namespace controller alone takes minutes over 2,500 pods, and nothing here is being measured."""
        for _ in range(10):  # at 10,000 pods one call can outlast the API server's request timeout
            try:
                pods = self.core.delete_collection_namespaced_pod
                finish(pods(namespace, grace_period_seconds=0, _preload_content=False))
            except Exception as error:  # what was deleted stays deleted: go on
                print(f"  deleting the pods of {namespace}: {error}; again", flush=True)
            left = self.core.list_namespaced_pod(namespace, limit=1, _preload_content=False)
            if not json.loads(finish(left))["items"]:
                break
        self.kubectl.run("delete", "namespace", namespace, "--timeout=900s")

    def tandem(self, namespace: str, profile: Path | None = None) -> Run:
        self.fresh(namespace)
        log = self.workdir / f"operator-{namespace}.log"
        log.unlink(missing_ok=True)
        operator = start_operator(
            operator_kubeconfig(self.kubectl, self.workdir / "operator.kubeconfig"), log
        )
        sampler = start_profile(operator.process.pid, profile) if profile else None
        try:
            _, user_before, system_before = proc_stats(operator.process.pid)  # startup: not counted
            loop_before = loop_thread_cpu(operator.process.pid)
            run = self.measure(
                namespace,
                lambda: run_tandem(
                    self.core, self.custom, namespace, self.jobs, self.workers, self.concurrency
                ),
            )
            run.operator_rss, user, system = proc_stats(operator.process.pid)
            run.operator_cpu = user - user_before + system - system_before
            run.operator_loop_cpu = loop_thread_cpu(operator.process.pid) - loop_before
            print(
                f"  operator CPU: user {user - user_before:.1f} s, system {system - system_before:.1f} s; "
                f"its asyncio loop's thread {run.operator_loop_cpu:.1f} s"
            )
            run.histogram = reconcile_histogram(operator.metrics(), "TrainingJob")
        finally:
            if sampler is not None:
                sampler.send_signal(2)  # py-spy writes its samples on SIGINT
                sampler.wait(60)
            operator.stop()
        finish(
            self.custom.delete_collection_namespaced_custom_object(
                "tandem.dev", "v1alpha1", namespace, "trainingjobs", _preload_content=False
            )
        )
        self.clear(namespace)
        return run


def start_profile(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling every thread of `pid` into collapsed stacks at `output` (waits are left out
    when read, see WAITING), without pausing the process (paused 200 times a second, the operator used
    8.1 s of CPU, not 4)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.unlink(missing_ok=True)
    command = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--output",
        str(output),
        "--rate",
        "100",
        "--nonblocking",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: Leaf frames of a thread waiting, not working: py-spy takes a thread blocked in C (epoll, a lock)
#: for a busy one. Its --gil mode was no better here: it names the GIL's last
#: holder, and gave the asyncio loop's thread 67-85% of the samples where /proc gave it 0.2 s of 3.3 s.
WAITING = (
    "select (selectors.py",
    "wait (threading.py",
    "_worker (thread.py:81)",
)


def profile_summary(collapsed: Path, top: int = 25) -> list[str]:
    """Where the sampled CPU went: the share of busy samples per function, inclusive and self (leaf)."""
    inclusive: dict[str, float] = {}
    leaf: dict[str, float] = {}
    total = waiting = 0.0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = float(count_text)
        frames = [re.sub(r" \(([^)]*/)?", " (", frame) for frame in stack.split(";")]
        if any(marker in frames[-1] for marker in WAITING):
            waiting += count
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0.0) + count
        leaf[frames[-1]] = leaf.get(frames[-1], 0.0) + count
    if not total:
        return ["no samples"]
    rows = [
        f"{total:.0f} busy samples ({waiting:.0f} waiting left out); inclusive share (self share): "
        "function (file:line)"
    ]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"  {100 * count / total:5.1f}% ({100 * leaf.get(frame, 0.0) / total:4.1f}%) {frame}")
    rows.append("self time, the top:")
    for frame, count in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"  {100 * count / total:5.1f}% {frame}")
    return rows


@dataclass
class Round:
    """One repeat: each floor's run and the Tandem run beside them."""

    floors: dict[str, Run]
    tandem: Run


def report(jobs: int, workers: int, rounds: list[Round], load: list[str]) -> None:
    pods = jobs * (workers + 1)
    kinds = list(rounds[0].floors)
    print()
    print(f"{jobs} TrainingJobs x {workers} workers ({pods} pods), floors and Tandem alternating:")
    print()
    floor_heads = " | ".join(f"floor ({kind})" for kind in kinds)
    ratio_heads = " | ".join(f"ratio to {kind}" for kind in kinds)
    print(
        f"| repeat | load (1 min) | {floor_heads} | Tandem | {ratio_heads} | operator peak RSS "
        "| operator CPU (its loop thread) | reconciles | reconcile p50 / p99 |"
    )
    print("|" + " --- |" * (7 + 2 * len(kinds)))
    for number, (one, seen) in enumerate(zip(rounds, load, strict=True), 1):
        tandem, histogram = one.tandem, one.tandem.histogram
        count = histogram[-1][1] if histogram else 0
        latency = (
            f"{quantile(histogram, 0.5) * 1000:.0f} / {quantile(histogram, 0.99) * 1000:.0f} ms"
            if histogram
            else "-"
        )
        floors = " | ".join(f"{one.floors[kind].seconds:.1f} s" for kind in kinds)
        ratios = " | ".join(f"{tandem.seconds / one.floors[kind].seconds:.2f}" for kind in kinds)
        print(
            f"| {number} | {seen} | {floors} | {tandem.seconds:.1f} s | {ratios} "
            f"| {tandem.operator_rss:.0f} MB | {tandem.operator_cpu:.1f} s "
            f"({tandem.operator_loop_cpu:.1f} s) | {count:.0f} | {latency} |"
        )
    floors = " | ".join(f"{statistics.median(r.floors[k].seconds for r in rounds):.1f} s" for k in kinds)
    ratios = " | ".join(
        f"{statistics.median(r.tandem.seconds / r.floors[k].seconds for r in rounds):.2f}" for k in kinds
    )
    print(
        f"| median | | {floors} | {statistics.median(r.tandem.seconds for r in rounds):.1f} s | {ratios} "
        f"| {max(r.tandem.operator_rss for r in rounds):.0f} MB (max) | | | |"
    )
    last = rounds[-1]
    for name, run in [*((f"floor ({k})", last.floors[k]) for k in kinds), ("Tandem", last.tandem)]:
        print()
        print(f"{name}, last repeat: control-plane CPU {run.control_plane_cpu}")
        print(f"{name}, last repeat: {run.timeline}")
        print()
        print(f"| {name}: writes to the API server | requests | per job |")
        print("| --- | --- | --- |")
        print("\n".join(run.writes))


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads creating objects")
    parser.add_argument(
        "--repeats", type=int, default=3, help="floor/Tandem rounds, alternating (the machine is noisy)"
    )
    parser.add_argument(
        "--floor",
        choices=(*FLOORS, "both"),
        default="children",
        help="what the plain script writes: every child the operator makes per job (children, the fair "
        "floor), the pods alone (pods, the floor of the earlier rounds), or both in each round",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the operator with py-spy (pip install py-spy) in the last Tandem phase and print "
        "where its CPU went; the collapsed stacks are kept in /tmp/CLUSTER/",
    )
    parser.add_argument(
        "--cluster", default=CLUSTER, help="dev cluster name (started and, unless kept, stopped)"
    )
    parser.add_argument("--keep-cluster", action="store_true")
    args = parser.parse_args()
    kinds = list(FLOORS) if args.floor == "both" else [args.floor]
    pods = args.jobs * (args.workers + 1)
    nodes = pods // PODS_PER_NODE + 2
    print(f"starting {args.cluster} with {nodes} CPU nodes for {pods} pods", flush=True)
    info = devcluster.up(
        args.cluster, gpu_nodes=0, cpu_nodes=nodes, progress=lambda m: print(f"  {m}", flush=True)
    )
    kubectl = Kubectl(str(info.bin_dir / "kubectl"), info.kubeconfig)
    install_crds(kubectl)
    core, custom = clients(info.kubeconfig)
    workdir = Path(f"/tmp/{args.cluster}")
    bench = Bench(kubectl, core, custom, workdir, args.jobs, args.workers, args.concurrency, args.cluster)
    rounds: list[Round] = []
    load: list[str] = []
    profile = workdir / "operator-profile.txt" if args.profile else None
    try:
        for number in range(1, args.repeats + 1):
            load.append(load_average())
            floors = {}
            for kind in kinds:
                print(
                    f"repeat {number}/{args.repeats}: floor ({kind}), load {load_average()} ...", flush=True
                )
                floors[kind] = bench.floor(kind, f"floor-{kind}-{number}")
                print(f"  floor {floors[kind].seconds:.1f} s; {floors[kind].timeline}", flush=True)
            print(f"repeat {number}/{args.repeats}: Tandem, load {load_average()} ...", flush=True)
            last = number == args.repeats
            tandem = bench.tandem(f"tandem-{number}", profile if last else None)
            print(f"  Tandem {tandem.seconds:.1f} s; {tandem.timeline}", flush=True)
            rounds.append(Round(floors, tandem))
    finally:
        if not args.keep_cluster:
            devcluster.down(args.cluster)
    report(args.jobs, args.workers, rounds, load)
    if profile is not None and profile.exists():
        print()
        print(f"operator profile (py-spy, last Tandem phase; stacks in {profile}):")
        print("\n".join(profile_summary(profile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
