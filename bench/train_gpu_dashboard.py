"""The Training dashboard's GPU panels (MFU, GPU utilisation, GPU memory) fed by a real GPU run.

No GPU reaches CI, so tests/metrics checks these panels only for being absent on a CPU. This script
closes the gap in two halves, on two machines:

    python bench/train_gpu_dashboard.py capture --out DIR   # on a GPU machine: torch, no Ray needed
    python bench/train_gpu_dashboard.py check DIR/gpu-metrics.jsonl [--png docs/img/training-gpu.png]

`capture` trains the built-in GPT on one GPU through the same loop a TrainingJob runs
(`loop.run_builtin`), with the head's own `ProgressReporter` and `TrainMetrics`; rank 0's GPU is sampled
once a second from a side thread as `RayHooks` does. Every second it keeps the head's `/metrics` text,
with its time. `check` replays those snapshots, in their own rhythm, to a real Prometheus (Debian's
package) through a small HTTP endpoint (the one stand-in: a replay, not the live process), then runs
every panel of the Training dashboard against it, as Grafana would expand it, and prints what each
panel shows; it exits non-zero when a GPU panel is empty or out of range.
"""

from __future__ import annotations

import argparse
import http.server
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[1]
JOB = "gpu-dash"
NAMESPACE = "bench"


def capture(out: Path, size: str, steps: int, batch: int, seq_len: int, device: str) -> int:
    import torch

    from tandem.api.common import Precision
    from tandem.workloads.train.config import TrainConfig
    from tandem.workloads.train.devices import GpuSampler
    from tandem.workloads.train.loop import CheckpointEvent, DistInfo, StepMetrics, run_builtin
    from tandem.workloads.train.progress import ProgressReporter, TrainMetrics

    metrics = TrainMetrics(JOB)
    reporter = ProgressReporter(metrics=metrics)
    gpu = device == "cuda"
    sampler = GpuSampler(0) if gpu else None
    snapshots: list[dict[str, Any]] = []
    done = threading.Event()

    class Hooks:
        def on_step(self, m: StepMetrics) -> None:
            reporter.step(m.to_dict())

        def on_checkpoint(self, event: CheckpointEvent) -> None:
            reporter.checkpoint(event.to_dict())

        def stop_requested(self) -> bool:
            return False

        def resume_hint(self) -> str | None:
            return None

    def every_second() -> None:
        while not done.wait(1.0):
            if sampler is not None:
                reporter.device(0, sampler.sample())
            snapshots.append({"time": time.time(), "text": metrics.text()})

    cfg = TrainConfig(
        job_name=JOB,
        model_size=size,
        dataset_uri="tandem://corpus",
        max_steps=steps,
        seq_len=seq_len,
        precision=Precision.BF16 if gpu else Precision.FP32,
        per_device_batch=batch,
        global_batch=batch,
        use_gpu=gpu,
        gpus_per_worker=1 if gpu else 0,
        compile=gpu,
        checkpoint_dir=str(Path(tempfile.mkdtemp(prefix="gpu-dash-ckpt-"))),
        checkpoint_every_steps=max(steps // 4, 1),
    )
    sampling = threading.Thread(target=every_second, daemon=True)
    sampling.start()
    started = time.perf_counter()
    result = run_builtin(cfg, DistInfo(), Hooks())
    done.set()
    sampling.join()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu-metrics.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in snapshots))
    record = reporter.record or {}
    print(
        f"{torch.cuda.get_device_name(0) if gpu else 'CPU'}: {size}, batch {batch} x {seq_len}, "
        f"{result.step} steps in "
        f"{time.perf_counter() - started:.0f}s, {record.get('tokensPerSecond')} tokens/s; "
        f"{len(snapshots)} snapshots in {path}"
    )
    for line in metrics.text().splitlines():
        if line.startswith(("tandem_train_mfu", "tandem_train_gpu_")):
            print(line)
    return 0


class Replay(http.server.BaseHTTPRequestHandler):
    """`/metrics` answers with the snapshot taken at the same offset into the captured run."""

    snapshots: ClassVar[list[dict[str, Any]]] = []
    started: ClassVar[float] = 0.0

    def do_GET(self) -> None:
        elapsed = time.time() - self.started
        first = self.snapshots[0]["time"]
        current = self.snapshots[0]
        for snapshot in self.snapshots:
            if snapshot["time"] - first <= elapsed:
                current = snapshot
        body = current["text"].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def check(snapshots_path: Path, png: Path | None) -> int:
    sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests" / "support")]
    from prometheus_process import start_prometheus_with

    from tandem.operator.dashboards import layout
    from tandem.operator.dashboards.build import RULES_FILE
    from tandem.operator.dashboards.expand import Context
    from tandem.operator.dashboards.render import draw, query_dashboard

    snapshots = [json.loads(line) for line in snapshots_path.read_text().splitlines() if line]
    if len(snapshots) < 10:
        print(f"error: {snapshots_path} holds {len(snapshots)} snapshots; capture a longer run (--steps)")
        return 2
    Replay.snapshots, Replay.started = snapshots, time.time()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scrape = {
        "job_name": "tandem-train",
        "honor_labels": True,
        "static_configs": [
            {"targets": [f"127.0.0.1:{server.server_address[1]}"], "labels": {"namespace": NAMESPACE}}
        ],
    }
    duration = snapshots[-1]["time"] - snapshots[0]["time"]
    workdir = Path(tempfile.mkdtemp(prefix="gpu-dash-prom-"))
    prometheus = start_prometheus_with(workdir, [scrape], [RULES_FILE])
    try:
        print(f"replaying {len(snapshots)} snapshots ({duration:.0f}s of the run) to Prometheus", flush=True)
        time.sleep(duration + 3)  # a replay at the run's own pace: there is nothing to wait on but time
        context = Context(
            start=Replay.started,
            end=time.time(),
            scrape_interval=1,
            max_data_points=200,
            variables={"namespace": NAMESPACE, "job": JOB},
        )
        data = query_dashboard(prometheus.url, layout.TRAINING, context)
    finally:
        prometheus.stop()
        server.shutdown()
    print("| panel | series | min | max |")
    print("| --- | --- | --- | --- |")
    failures = []
    ranges = {"mfu": (0.01, 1.0), "gpu_utilization": (0.0, 1.0), "gpu_memory": (1e6, 1e12)}
    for key, panel in data.items():
        values = [v for line in panel.lines for _, v in line.points]
        low, high = (min(values), max(values)) if values else (float("nan"), float("nan"))
        print(f"| {key} | {len(panel.lines)} | {low:.4g} | {high:.4g} |")
        if key in ranges and not (values and ranges[key][0] <= low and high <= ranges[key][1]):
            failures.append(f"{key}: {low:.4g}..{high:.4g} not in {ranges[key]}")
    if png is not None:
        draw(layout.TRAINING, data, png)
        print(f"drawn: {png}")
    for failure in failures:
        print(f"error: {failure}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("capture", help="train on one GPU and keep the metrics text every second")
    cap.add_argument("--out", type=Path, required=True, help="folder for gpu-metrics.jsonl")
    cap.add_argument("--size", default="124m", help="built-in GPT size (default 124m)")
    cap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    cap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    cap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    cap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a dry run of the script (no GPU series)",
    )
    chk = commands.add_parser("check", help="replay a capture to Prometheus and query every panel")
    chk.add_argument("snapshots", type=Path, help="gpu-metrics.jsonl from `capture`")
    chk.add_argument("--png", type=Path, help="also draw the dashboard to this PNG")
    args = parser.parse_args()
    if args.command == "capture":
        return capture(args.out, args.size, args.steps, args.batch, args.seq_len, args.device)
    return check(args.snapshots, args.png)


if __name__ == "__main__":
    raise SystemExit(main())
