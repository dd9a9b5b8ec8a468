"""`tandem serve ...`: the model server (also `python -m tandem.workloads.serve`, and the container command
of InferenceService pods). Heavy imports (torch, uvicorn) happen only when the command runs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from tandem.api.options import add_options, parse_options
from tandem.api.serving import ServerOptions
from tandem.errors import UserError

DESCRIPTION = """\
Serve one model over HTTP with dynamic batching.

Runtimes and their endpoints:
  embeddings   a sentence-transformers directory    POST /v1/embeddings (OpenAI)
  torchscript  a TorchScript file or directory      POST /v2/models/NAME/infer (Open Inference Protocol)
  causal-lm    a Tandem training checkpoint         POST /v1/completions, /v1/chat/completions (OpenAI,
                                                    stream: true over SSE)
  noop         (benchmarks) no model: zero vectors  POST /v1/embeddings, the server's own cost
Every runtime: GET /v2/health/live, /v2/health/ready, /v2/models/NAME[/ready], /v1/models, /metrics.

Batching: a batch leaves when it has --max-batch-size items or its oldest item has waited
--max-queue-delay-ms; past --max-queue-size waiting items, or when the expected queue wait passes
--max-queue-wait-ms, requests get 429 with Retry-After.
causal-lm batches continuously: sequences join and leave the running batch between decoding steps.
Connections: a client that sends nothing or half its headers is closed after --header-timeout-s, a
half-sent body gets 408 after --body-timeout-s, and beyond --max-connections a new connection gets 503.
SIGTERM drains: requests already accepted finish, new ones get 503 with Connection: close, idle
connections are closed cleanly, then the server exits 0.
--workers N runs N server processes on one port (one model copy each); a crashed one stops the server.
"""

EPILOG = """\
examples:
  tandem serve --runtime embeddings --model-uri ./all-MiniLM-L6-v2
  tandem serve --runtime torchscript --model-uri file:///models/resnet/model.pt --device cuda --precision fp16
  tandem serve --runtime causal-lm --model-uri ./tandem-runs/demo/checkpoints --max-batch-size 16
See docs/serving.md.
"""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the model server (the InferenceService container command)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, ServerOptions)
    parser.set_defaults(handler=run)


def options_from(args: argparse.Namespace) -> ServerOptions:
    """The parsed options as the one serving model (UserError naming the option for a bad value)."""
    return parse_options(ServerOptions, args)


def build_config(options: ServerOptions) -> Any:
    """The process's `ServerConfig`: the options, with the model found (downloaded if s3://)."""
    from tandem.workloads.serve.batcher import BatchingConfig
    from tandem.workloads.serve.http import HttpLimits
    from tandem.workloads.serve.model import ModelOptions, default_model_name, resolve_model_path
    from tandem.workloads.serve.server import ServerConfig

    settings, batching, http = options.model, options.batching, options.http
    cache_dir = Path(settings.model_cache_dir) if settings.model_cache_dir else None
    path = resolve_model_path(settings.model_uri, cache_dir)
    name = settings.model_name or default_model_name(path)
    if not name or "/" in name:
        raise UserError(f"--model-name {name!r}: use a non-empty name without '/'")
    return ServerConfig(
        runtime=settings.runtime,
        model=ModelOptions(
            name=name,
            path=path,
            device=settings.device,
            precision=settings.precision,
            kv_cache=settings.kv_cache,
            cuda_graphs=settings.cuda_graphs,
        ),
        batching=BatchingConfig.from_spec(batching),
        limits=HttpLimits(
            max_request_bytes=http.max_request_bytes,
            body_timeout_s=http.body_timeout_s,
            header_timeout_s=http.header_timeout_s,
            max_connections=http.max_connections,
        ),
        host=http.host,
        port=http.port,
        drain_timeout_s=http.drain_timeout_s,
        log_level=http.log_level.value,
        access_log=http.access_log,
        workers=batching.workers,
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = options_from(args)
    logging.basicConfig(
        level=options.http.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = build_config(options)
    from tandem.workloads.serve.server import serve

    return serve(config)


def main(argv: list[str] | None = None) -> int:
    """`python -m tandem.workloads.serve ...`: the same options as `tandem serve`."""
    import sys

    from tandem import commands

    return commands.run(
        commands.parser_with(register), ["serve", *(argv if argv is not None else sys.argv[1:])]
    )
