"""`tandem train ...`: run a TrainingJob locally, or as a pod's head or worker.

    tandem train JOB.yaml --local     run the TrainingJob on this machine (a local Ray cluster)
    tandem train head                 the head pod's command (environment from the operator)
    tandem train worker               a worker pod's command
    tandem train corpus FILE          write the built-in corpus (tandem://corpus) to FILE

Nothing heavy (torch, ray) is imported until a command runs.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tandem.errors import UserError
from tandem.workloads.train.checkpoint import probe_writable

if TYPE_CHECKING:
    from tandem.workloads.train.progress import ProgressBar

EPILOG = """\
modes:
  tandem train JOB.yaml --local   run a TrainingJob on this machine (local Ray, CPU or local GPUs)
  tandem train head               Ray head + driver, in the head pod the operator creates
  tandem train worker             Ray worker, in each worker pod
  tandem train corpus FILE        write the built-in demo corpus (dataset uri tandem://corpus)

The pod commands read their settings from one run document in the environment (TANDEM_RUN);
see docs/training.md.
"""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "train",
        help="run a TrainingJob locally, or as a pod's head/worker",
        description="Run a TrainingJob locally, or as a pod's head/worker.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="JOB.yaml|head|worker|corpus", help="a TrainingJob file, or a mode")
    p.add_argument("output", nargs="?", help="(corpus) the file to write")
    local = p.add_argument_group("local runs (JOB.yaml --local)")
    local.add_argument(
        "--local",
        action="store_true",
        help="run the job on this machine, on a Ray instance of its own that ends with it (never a "
        "cluster that RAY_ADDRESS or `ray start` set up, which it leaves alone)",
    )
    local.add_argument(
        "--checkpoint-dir",
        help="checkpoint root, standing for spec.checkpoint.storage (default: the spec's storage.uri "
        "if it has one, else ./tandem-runs/NAME/checkpoints); a run resumes from its newest checkpoint",
    )
    local.add_argument("--data-root", help="directory holding pvc://CLAIM/PATH data sets as CLAIM/PATH")
    local.add_argument("--workers", type=int, help="override spec.workers.replicas")
    local.add_argument(
        "--seed", type=int, help="set spec.seed, the random seed (default: the spec's, 0 unless set)"
    )
    local.add_argument(
        "--seq-len",
        type=int,
        help="set spec.trainer.builtin.sequenceLength (default: the spec's, else the model size's)",
    )
    local.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        help="set spec.trainer.strategy: ddp (each worker holds the whole model) or fsdp (the model "
        "sharded over the workers); default: the spec's, ddp unless set",
    )
    local.add_argument("--no-progress", action="store_true", help="no progress bar")
    local.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the run's Prometheus /metrics on this port, as a pod's head does (default: none)",
    )
    pod = p.add_argument_group("pods (head)")
    pod.add_argument("--port", type=int, default=6379, help="Ray GCS port of the head")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    target = args.target
    if target == "head":
        from tandem.workloads.train.pod import head

        return head(args)
    if target == "worker":
        from tandem.workloads.train.pod import worker

        return worker(args)
    if target == "corpus":
        return write_corpus(args.output)
    if not args.local:
        raise UserError(
            f"`tandem train {target}` needs --local to run the job on this machine "
            "(to run it on Kubernetes: kubectl apply -f it)"
        )
    return run_local(args)


def write_corpus(output: str | None) -> int:
    if not output:
        raise UserError("tandem train corpus FILE: say which file to write")
    from tandem.workloads.data.corpus import builtin_corpus

    data = builtin_corpus()
    Path(output).write_bytes(data)
    print(f"wrote {len(data):,} bytes to {output}")
    return 0


def load_job(path: str) -> tuple[str, dict[str, Any]]:
    """(name, spec) of a TrainingJob YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file; pass a TrainingJob YAML file (or head/worker/corpus)")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "TrainingJob":
        raise UserError(
            f"{path}: not a TrainingJob (kind: {doc.get('kind') if isinstance(doc, dict) else None})"
        )
    if not isinstance(doc.get("spec"), dict):
        raise UserError(f"{path}: spec: missing; a TrainingJob needs a spec")
    name = str((doc.get("metadata") or {}).get("name") or p.stem)
    return name, doc["spec"]


def with_overrides(
    spec: dict[str, Any], *, seed: int | None, seq_len: int | None, strategy: str | None = None
) -> dict[str, Any]:
    """The spec with `--seed`, `--seq-len` and `--strategy` written into their fields (`spec.seed`,
    `spec.trainer.builtin.sequenceLength`, `spec.trainer.strategy`), so they are validated and
    recorded like any spec value."""
    out = dict(spec)
    if seed is not None:
        out["seed"] = seed
    if strategy is not None:
        out["trainer"] = dict(out.get("trainer") or {}) | {"strategy": strategy}
    if seq_len is not None:
        trainer = dict(out.get("trainer") or {})
        if not isinstance(trainer.get("builtin"), dict):
            raise UserError(
                "--seq-len sets spec.trainer.builtin.sequenceLength: this job has no built-in trainer"
            )
        trainer["builtin"] = dict(trainer["builtin"]) | {"sequenceLength": seq_len}
        out["trainer"] = trainer
    return out


def import_from_cwd() -> None:
    """Make modules in the current directory importable by the driver and by the local Ray ranks
    (they inherit `PYTHONPATH`), as `python -m` would: `tandem train job.yaml --local` next to your
    `my_train.py` runs `entrypoint: my_train:train_loop` without installing it."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *filter(None, paths)])


DEFAULT_CHECKPOINT_DIR = "tandem-runs/{name}/checkpoints"
"""Where a local run checkpoints when neither `--checkpoint-dir` nor `spec.checkpoint.storage.uri` says."""


def local_checkpoint_dir(spec: dict[str, Any], name: str, option: str | None) -> tuple[str, str]:
    """(checkpoint root, what chose it) of a local run: `--checkpoint-dir`, else the spec's
    `checkpoint.storage.uri` (the same root the job's pods use), else `./tandem-runs/NAME/checkpoints`
    (a `storage.pvc` names a claim, which only exists in the cluster)."""
    if option:
        return str(Path(option).resolve()), "--checkpoint-dir"
    checkpoint = spec.get("checkpoint")
    storage = checkpoint.get("storage") if isinstance(checkpoint, dict) else None
    uri = storage.get("uri") if isinstance(storage, dict) else None
    if isinstance(uri, str) and uri:
        if not uri.startswith("file://"):
            return uri, "spec.checkpoint.storage.uri"  # from_spec refuses it, naming the field
        return str(Path(uri.removeprefix("file://")).resolve()), "spec.checkpoint.storage.uri"
    return str(Path(DEFAULT_CHECKPOINT_DIR.format(name=name)).resolve()), "the default checkpoint root"


def check_checkpoint_dir(checkpoint_dir: str, origin: str) -> None:
    """Make the checkpoint root and write a probe file in it, before Ray or torch start: a bad root
    (under a regular file, read-only, not a directory) is an error naming what set it, not a traceback
    from the first checkpoint or a message about a field that merely lives next to it."""
    path = Path(checkpoint_dir.removeprefix("file://"))
    try:
        probe_writable(checkpoint_dir)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if origin == "--checkpoint-dir":
            message = (
                f"--checkpoint-dir (this run's spec.checkpoint.storage): cannot write checkpoints to "
                f"{path} ({why}); pass a writable directory"
            )
        elif origin == "spec.checkpoint.storage.uri":
            message = (
                f"spec.checkpoint.storage.uri: cannot write checkpoints to {path} ({why}); fix the uri, "
                "or pass a writable directory with --checkpoint-dir"
            )
        else:
            message = (
                f"cannot write checkpoints to the default checkpoint root {path} ({why}); pass a writable "
                "directory with --checkpoint-dir (it stands for spec.checkpoint.storage locally)"
            )
        raise UserError(message) from None


class StatusLine:
    """Keeps the progress line at the bottom of the terminal while other output goes above it.

    Ray prints what the ranks write (their warnings, a user loop's `print`) to this process's
    `sys.stdout`/`sys.stderr` whenever it arrives; written after a progress line, which ends in `\r`
    and no newline, it ran on from the bar. While installed, the bar writes through `bar_stream`, and
    any other write to stdout or stderr first clears the bar's line and, once its text ends a line,
    redraws the bar below it. (tqdm's `write` does this for code that calls it; Ray does not.)
    """

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self._out, self._err = stdout, stderr
        self._lock = threading.RLock()
        self._line = ""  # the bar as last drawn ("" when none is on screen)
        self._mid_line = False  # other output began a line and has not ended it yet
        self.bar_stream = _Stream(self._err, self._draw)
        self.stdout = _Stream(self._out, self._above)
        self.stderr = _Stream(self._err, self._above)

    def _draw(self, real: TextIO, text: str) -> None:
        with self._lock:
            if text.startswith("\r"):
                self._line = text
                if self._mid_line:
                    return  # drawn once the other line ends
            elif text.endswith("\n"):
                self._line = ""  # the bar closed its line
            real.write(text)
            real.flush()

    def _above(self, real: TextIO, text: str) -> None:
        with self._lock:
            if self._line and not self._mid_line:
                self._err.write("\r\033[K")
                self._err.flush()
            real.write(text)
            real.flush()
            self._mid_line = not text.endswith("\n")
            if self._line and not self._mid_line:
                self._err.write(self._line)
                self._err.flush()


class _Stream(io.TextIOBase):
    """A text stream whose writes go to `write(real, text)`."""

    def __init__(self, real: TextIO, write: Callable[[TextIO, str], None]) -> None:
        self._real, self._write = real, write

    def write(self, text: str) -> int:
        if text:
            self._write(self._real, text)
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._real.encoding


def progress_bar() -> ProgressBar:
    """The run's progress bar; on a terminal, with a `StatusLine` on stdout and stderr for the rest of
    the process (Ray's output is printed from its threads until the process exits)."""
    from tandem.workloads.train.progress import ProgressBar

    if not sys.stderr.isatty():
        return ProgressBar()  # a file or a pipe: one line per update, nothing to keep apart
    status_line = StatusLine(sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = status_line.stdout, status_line.stderr
    return ProgressBar(status_line.bar_stream)  # type: ignore[arg-type]


def run_local(args: argparse.Namespace) -> int:
    from tandem.workloads.train.config import from_spec

    name, spec = load_job(args.target)
    spec = with_overrides(spec, seed=args.seed, seq_len=args.seq_len, strategy=args.strategy)
    ckpt_dir, ckpt_origin = local_checkpoint_dir(spec, name, args.checkpoint_dir)
    # Absolute paths: the Ray ranks run in a working directory of Ray's, not this one.
    data_root = None if args.data_root is None else str(Path(args.data_root).resolve())
    cfg = from_spec(
        spec,
        job_name=name,
        checkpoint_dir=ckpt_dir,
        data_root=data_root,
        num_workers=args.workers,
    )
    if cfg.checkpoint_dir:
        check_checkpoint_dir(cfg.checkpoint_dir, ckpt_origin)
    if cfg.entrypoint:
        from tandem.workloads.train.session import resolve_entrypoint

        import_from_cwd()
        resolve_entrypoint(cfg.entrypoint)
    # Everything is checked: now take resources.
    from tandem.workloads.train.progress import ProgressReporter
    from tandem.workloads.train.ray_runner import run

    bar = None if args.no_progress else progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            f"\n{signal.Signals(signum).name}: checkpointing and stopping (again to abort)", file=sys.stderr
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = None
    if args.metrics_port is not None:
        from tandem.workloads.train.progress import TrainMetrics

        metrics = TrainMetrics(name)
        metrics.serve(args.metrics_port)
    from tandem.workloads.train.tracking import open_tracker

    tracker = open_tracker(cfg)  # spec.tracking: TensorBoard event files, MLflow
    reporter = ProgressReporter(bar=bar, metrics=metrics, tracker=tracker)
    steps = cfg.user_config.get("maxSteps", cfg.user_config.get("steps")) if cfg.entrypoint else cfg.max_steps
    print(
        f"training {name}: {cfg.model_size or cfg.entrypoint}, {cfg.num_workers} worker(s)"
        f"{', fsdp' if cfg.strategy == 'fsdp' else ''}, "
        f"{steps if steps is not None else 'its own number of'} steps, checkpoints in {ckpt_dir}",
        file=sys.stderr,
    )
    status = "failed"
    try:
        outcome = run(cfg, reporter, stop=stop, data_root=data_root, quiet=True)
        status = outcome.status
    finally:
        if tracker is not None:
            tracker.close(status)
    if outcome.status == "failed":
        print(f"error: training failed: {outcome.error}", file=sys.stderr)
        return 1
    resumed = f" (resumed at step {outcome.start_step})" if outcome.start_step else ""
    early = " by early stopping" if outcome.early_stopped else ""
    best = (
        f"; best eval loss {outcome.best_eval_loss:.4f} at step {outcome.best_eval_step}"
        if outcome.best_eval_loss is not None
        else ""
    )
    print(
        f"{outcome.status}{early} at step {outcome.step}{resumed}, loss {outcome.loss}{best}; "
        f"last checkpoint {outcome.checkpoint_uri}",
        file=sys.stderr,
    )
    return 0 if outcome.status == "completed" else 143
