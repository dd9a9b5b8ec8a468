"""`tandem serve ...`: the model server (also `python -m tandem.workloads.serve`, and the container command
of InferenceService pods). Heavy imports (torch, uvicorn) happen only when the command runs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from tandem.errors import UserError

DESCRIPTION = """\
Serve one model over HTTP with dynamic batching.

Runtimes and their endpoints:
  embeddings   a sentence-transformers directory    POST /v1/embeddings (OpenAI)
  torchscript  a TorchScript file or directory      POST /v2/models/NAME/infer (Open Inference Protocol)
  causal-lm    a Tandem training checkpoint         POST /v1/completions (OpenAI, stream: true over SSE)
  noop         (benchmarks) no model: zero vectors  POST /v1/embeddings, the server's own cost
Every runtime: GET /v2/health/live, /v2/health/ready, /v2/models/NAME[/ready], /v1/models, /metrics.

Batching: a batch leaves when it has --max-batch-size items or its oldest item has waited
--max-queue-delay-ms; past --max-queue-size waiting items, requests get 429 with Retry-After.
causal-lm batches continuously: sequences join and leave the running batch between decoding steps.
SIGTERM drains: requests already accepted finish, new ones get 503, then the server exits 0.
--workers N runs N server processes on one port (one model copy each); a crashed one stops the server.
"""

EPILOG = """\
examples:
  tandem serve --runtime embeddings --model-uri ./all-MiniLM-L6-v2
  tandem serve --runtime torchscript --model-uri file:///models/resnet/model.pt --device cuda --precision fp16
  tandem serve --runtime causal-lm --model-uri ./tandem-runs/demo/checkpoints --max-batch-size 16
See docs/serving.md.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(part) for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-uri",
        required=True,
        help="the model: a local path, file:///path or s3://BUCKET/KEY (a prefix or one object) (required)",
    )
    model.add_argument(
        "--model-cache-dir",
        default=os.environ.get("TANDEM_MODEL_CACHE") or None,
        help="where s3:// models are downloaded; a finished download is reused "
        "(default $TANDEM_MODEL_CACHE, else ~/.cache/tandem/models)",
    )
    model.add_argument(
        "--runtime",
        required=True,
        choices=["embeddings", "torchscript", "causal-lm", "noop"],
        help="how to load and serve it (required)",
    )
    model.add_argument("--model-name", help="name clients use (default: the model directory's name)")
    model.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16", "int8"],
        default="fp32",
        help="fp32; bf16 or fp16 on GPU; int8 = dynamic quantization of Linear layers on CPU (default fp32)",
    )
    model.add_argument(
        "--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N (default auto)"
    )
    model.add_argument(
        "--kv-cache",
        choices=["on", "off"],
        default="on",
        help="causal-lm: keep each sequence's keys and values between decoding steps (default on); off "
        "recomputes every context at every step",
    )

    batching = parser.add_argument_group("dynamic batching")
    batching.add_argument(
        "--max-batch-size", type=_positive_int, default=32, help="most items per forward pass (default 32)"
    )
    batching.add_argument(
        "--max-queue-delay-ms",
        type=_non_negative_float,
        default=5.0,
        help="longest an item waits for its batch to fill; 0 = run what is queued (default 5)",
    )
    batching.add_argument(
        "--max-queue-size",
        type=_positive_int,
        default=1024,
        help="most items waiting; more get 429 + Retry-After (default 1024, at least --max-batch-size)",
    )
    batching.add_argument(
        "--preferred-batch-sizes",
        type=_sizes,
        default=(),
        metavar="N[,N...]",
        help="sizes the model runs best at: dispatch as soon as the largest is queued (default none)",
    )
    batching.add_argument(
        "--max-concurrent-batches",
        type=_positive_int,
        default=1,
        help="batches computing at once; >1 overlaps CPU pre-processing with GPU compute (default 1)",
    )
    batching.add_argument(
        "--request-timeout-s",
        type=_non_negative_float,
        default=30.0,
        help="answer 504 after this long, queueing included; 0 = no limit (default 30)",
    )

    http = parser.add_argument_group("HTTP")
    http.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 in a container (default 127.0.0.1)"
    )
    http.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (default 8080)")
    http.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=8 * 1024 * 1024,
        help="largest request body; larger ones get 413 (default 8 MiB)",
    )
    http.add_argument(
        "--drain-timeout-s",
        type=_non_negative_float,
        default=30.0,
        help="on SIGTERM, how long in-flight requests may take to finish (default 30)",
    )
    http.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default info)"
    )
    http.add_argument("--access-log", action="store_true", help="log every request")

    processes = parser.add_argument_group("processes")
    processes.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="server processes sharing the port, each with its own copy of the model and its own batcher; "
        "for a small model on a GPU whose Python-side work saturates one core "
        "(default $TANDEM_SERVE_WORKERS, else 1)",
    )


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the model server (the InferenceService container command)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)


def build_config(args: argparse.Namespace) -> Any:
    """The `ServerConfig` for parsed arguments (UserError for contradictions)."""
    from tandem.workloads.serve.batcher import BatchingConfig
    from tandem.workloads.serve.http import HttpLimits
    from tandem.workloads.serve.model import (
        ModelOptions,
        Precision,
        Runtime,
        default_model_name,
        resolve_model_path,
    )
    from tandem.workloads.serve.server import ServerConfig

    cache_dir = Path(args.model_cache_dir) if args.model_cache_dir else None
    path = resolve_model_path(args.model_uri, cache_dir)
    try:
        batching = BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_size=args.max_queue_size,
            preferred_batch_sizes=args.preferred_batch_sizes,
            max_concurrent_batches=args.max_concurrent_batches,
            timeout_s=args.request_timeout_s or None,
        )
    except ValueError as exc:
        raise UserError(f"batching: {exc}; fix the --max-* options") from exc
    if args.kv_cache == "off" and args.runtime != "causal-lm":
        raise UserError(f"--kv-cache applies to --runtime causal-lm only; remove it for {args.runtime}")
    name = args.model_name or default_model_name(path)
    if not name or "/" in name:
        raise UserError(f"--model-name {name!r}: use a non-empty name without '/'")
    return ServerConfig(
        runtime=Runtime(args.runtime),
        model=ModelOptions(
            name=name,
            path=path,
            device=args.device,
            precision=Precision(args.precision),
            kv_cache=args.kv_cache == "on",
        ),
        batching=batching,
        limits=HttpLimits(max_request_bytes=args.max_request_bytes),
        host=args.host,
        port=args.port,
        drain_timeout_s=args.drain_timeout_s,
        log_level=args.log_level,
        access_log=args.access_log,
        workers=_workers(args.workers),
    )


def _workers(flag: int | None) -> int:
    """`--workers`, else `$TANDEM_SERVE_WORKERS` (the operator's way to set it), else 1."""
    if flag is not None:
        return flag
    text = os.environ.get("TANDEM_SERVE_WORKERS", "").strip()
    if not text:
        return 1
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"TANDEM_SERVE_WORKERS={text!r}: {exc}; set a whole number >= 1") from None


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = build_config(args)
    from tandem.workloads.serve.server import serve

    return serve(config)


def main(argv: list[str] | None = None) -> int:
    """`python -m tandem.workloads.serve ...`: the same options as `tandem serve`."""
    import sys

    from tandem import commands

    return commands.run(
        commands.parser_with(register), ["serve", *(argv if argv is not None else sys.argv[1:])]
    )
