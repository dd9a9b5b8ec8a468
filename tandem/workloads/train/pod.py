"""`tandem train head` and `tandem train worker`: the commands of a TrainingJob's pods.

The contract with the operator: one run document (`TANDEM_RUN`, parsed with
`tandem.api.trainingrun`), exit codes, and the progress annotation; docs/training.md writes it down.
Torch and Ray are imported only once a command runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tandem.api.trainingrun import RAY_GCS_PORT, TrainingRun
from tandem.errors import UserError
from tandem.workloads.train.checkpoint import probe_writable
from tandem.workloads.train.config import from_run

log = logging.getLogger(__name__)

RAY_PORT = RAY_GCS_PORT
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STOPPED = 143  # stopped by SIGTERM after a final checkpoint (128 + SIGTERM)


def _ray_cli() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else (shutil.which("ray") or "ray")


def worker_resources(run: TrainingRun) -> tuple[int, int]:
    """(CPUs, GPUs) a worker pod offers Ray, from `spec.workers.resources` (what the pod was given)."""
    resources = run.spec.workers.resources
    cores = resources.cpu_cores()
    return max(1, int(cores)) if cores is not None else 1, resources.gpu


def check_writable(checkpoint_dir: str) -> None:
    """The checkpoint folder exists (made if missing) and this process may write there; a UserError
    naming the field before Ray starts, instead of a traceback from deep inside the first checkpoint."""
    path = Path(checkpoint_dir.removeprefix("file://"))
    try:
        probe_writable(checkpoint_dir)
    except OSError as exc:
        raise UserError(
            f"spec.checkpoint.storage: cannot write checkpoints to {path} ({exc.strerror}, "
            f"uid {os.getuid()}): the volume must be writable by the pods' user (Tandem's images run as "
            "uid 65532; give the volume's folder to that user, or an fsGroup the volume honours)"
        ) from None


def wait_for_workers(expected: int, timeout: float, *, poll: float = 1.0) -> int:
    """Block until `expected` Ray nodes offering a worker slot are alive; UserError on timeout."""
    import ray

    from tandem.workloads.train.ray_runner import WORKER_RESOURCE

    deadline = time.monotonic() + timeout
    while True:
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        alive = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get(WORKER_RESOURCE)]
        if len(alive) >= expected:
            return len(alive)
        if time.monotonic() >= deadline:
            raise UserError(
                f"only {len(alive)} of {expected} workers joined the Ray cluster within {timeout:.0f}s; "
                "check that the worker pods are running and can reach the head service on port "
                f"{RAY_PORT} (the run document's workerWaitSeconds sets the timeout)"
            )
        time.sleep(poll)  # polling the cluster state: there is no event to wait on


def head(args: Any) -> int:
    """Start the Ray head, wait for the workers, train, report progress; exit 0 / 1 / 143."""
    from tandem.workloads.train.progress import PodAnnotationWriter, ProgressReporter, TrainMetrics
    from tandem.workloads.train.ray_runner import apply_ray_env, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = TrainingRun.from_env()
    cfg = from_run(env)  # a bad spec fails here, before Ray starts
    if cfg.checkpoint_dir:
        check_writable(cfg.checkpoint_dir)
    if cfg.entrypoint:
        from tandem.workloads.train.session import resolve_entrypoint

        resolve_entrypoint(cfg.entrypoint)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    metrics = TrainMetrics(env.job_name)
    metrics.serve(env.metrics_port)
    from tandem.workloads.train.tracking import open_tracker

    tracker = open_tracker(cfg)  # spec.tracking: TensorBoard event files, MLflow
    reporter = ProgressReporter(writer=PodAnnotationWriter.from_env(), metrics=metrics, tracker=tracker)
    port = getattr(args, "port", RAY_PORT)
    apply_ray_env()  # `ray start` and this driver: Tandem's Ray settings (ray_runner.RAY_ENV)
    subprocess.run(
        [
            _ray_cli(),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=0",
            "--num-gpus=0",
            "--disable-usage-stats",
        ],
        check=True,
    )
    import ray

    ray.init(address=f"127.0.0.1:{port}", configure_logging=False)
    status = "failed"
    try:
        n = wait_for_workers(cfg.num_workers, env.worker_wait_seconds)
        log.info("%d workers joined; training %s (attempt %d)", n, env.job_name, env.attempt)
        outcome = run(cfg, reporter, cluster=True, stop=stop)
        status = outcome.status
    finally:
        if tracker is not None:
            tracker.close(status)
        ray.shutdown()
        subprocess.run([_ray_cli(), "stop", "--force"], check=False, capture_output=True)
    log.info("run ended: %s", outcome)
    if outcome.status == "completed":
        return EXIT_OK
    if outcome.status == "stopped":
        return EXIT_STOPPED
    print(f"error: training failed: {outcome.error}", file=sys.stderr)
    return EXIT_FAILED


def resolved(address: str) -> str:
    """`host:port` with the host resolved to an IP now (the name itself if it does not resolve yet)."""
    host, _, port = address.rpartition(":")
    try:
        return f"{socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0]}:{port}"
    except OSError:
        return address


def head_answers(address: str, timeout: float = 1.0) -> bool:
    """True if the head's Ray port (`host:port`) accepts a TCP connection now."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_head(address: str, deadline: float, every: float = 1.0) -> None:
    """Block until the head's Ray port answers; UserError at `deadline` (time.monotonic()).

    `ray start --address` alone gives up after about 30 s with exit 1, which by its duration looks like a
    run that ended; a new gang's head can start a minute after its workers, while the old gang still
    frees the node's CPUs (seen: a worker left as Completed and the run waited for ever on one rank)."""
    while not head_answers(address, every):
        if time.monotonic() >= deadline:
            raise UserError(
                f"the Ray head at {address} did not answer within the run document's "
                "workerWaitSeconds; check the head pod and its service"
            )
        time.sleep(every)  # polling a port: there is no event to wait on


def leave_when_head_gone(
    node: subprocess.Popen[bytes], head_address: str, every: float = 1.0, misses: int = 3
) -> bool:
    """Stop this pod's Ray node once the head has not answered `misses` times in a row (it ended the
    run, or it is gone); True if it did. Returns False when the node exits by itself first."""
    missed = 0
    while node.poll() is None:
        if head_answers(head_address, every):
            missed = 0
        else:
            missed += 1
            if missed >= misses:
                log.info("the head at %s no longer answers: stopping this node", head_address)
                node.terminate()
                return True
        time.sleep(every)
    return False


def worker(args: Any) -> int:
    """Join the head's Ray cluster with this pod's resources and block until the cluster goes away."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = TrainingRun.from_env()
    cpus, gpus = worker_resources(env)
    from tandem.workloads.train.ray_runner import WORKER_RESOURCE, apply_ray_env

    apply_ray_env()  # inherited by `ray start` and so by this node's Ray processes
    resources = json.dumps({WORKER_RESOURCE: 1})
    deadline = time.monotonic() + env.worker_wait_seconds
    cmd = [
        _ray_cli(),
        "start",
        f"--address={env.head_address}",
        f"--num-cpus={cpus}",
        f"--num-gpus={gpus}",
        f"--resources={resources}",
        "--disable-usage-stats",
        "--block",
    ]
    # SIGTERM: the head checkpoints and ends the run; this node (and its training rank) stays up until
    # then, within the pod's grace period. `ray start --block` returns when the head goes away, but only
    # after Ray's GCS reconnect timeout (about a minute): once the head stops answering, leave at once.
    # The head is probed at the address it had when this node joined: the operator empties the head
    # Service's endpoints as it deletes a gang, while the head still needs this rank for its checkpoint.
    current: list[tuple[subprocess.Popen[bytes], str]] = []
    stopping = threading.Event()

    def on_sigterm(*_: Any) -> None:
        log.info("SIGTERM: waiting for the head to end the run")
        stopping.set()
        if current:
            watcher = threading.Thread(target=leave_when_head_gone, args=current[-1], daemon=True)
            watcher.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    while True:
        wait_for_head(env.head_address, deadline)
        t0 = time.monotonic()
        head = resolved(env.head_address)
        current.append((subprocess.Popen(cmd), head))
        rc = current[-1][0].wait()
        if time.monotonic() - t0 > 30 or rc == 0 or stopping.is_set():
            log.info("the Ray cluster went away (ray start exited %d): the head ended the run", rc)
            return EXIT_OK
        if time.monotonic() >= deadline:
            raise UserError(
                f"could not join the Ray head at {env.head_address} within "
                f"{env.worker_wait_seconds:.0f}s; check the head pod and its service"
            )
        time.sleep(2)  # the head is not up yet: retry (ray start has no wait-for-head option)
