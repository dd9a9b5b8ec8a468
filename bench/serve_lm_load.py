"""Open-loop load on the causal-lm server (Tandem's GPT): model ceiling, batching off, continuous batching,
Ray Serve.

    .venv/bin/python bench/serve_lm_load.py --size tiny --rates 2,8,32 --duration-s 4   # CPU smoke test
    python bench/serve_lm_load.py --device cuda --size 124m --precision bf16 --clients 4 \\
        --variants a,s,b,c,d --rates 2,4,8,16,32,64,128,256 --duration-s 8 --slo-ms 1000 \\
        --out results.json                                                              # one GPU

Variants, all in one run, on the same checkpoint, same prompts and same load generator:
  a   the model's ceiling, no server: the runtime's own decoding step (`CausalLM.step`, the code path the
      server runs) over a static batch of --max-batch-size prompts for --max-tokens steps, in a loop,
      with the scheduler's per-step bookkeeping (append the token) and nothing else
  s   (diagnostic) Tandem's continuous-batching scheduler in this process, no HTTP: a backlog of requests
      submitted at once, the scheduler's own throughput at saturation
  b   `tandem serve --runtime causal-lm --max-batch-size 1` (batching off: one sequence at a time)
  c   `tandem serve --runtime causal-lm` with continuous batching (--max-batch-size, --max-queue-delay-ms)
  n   (c) with `--kv-cache off`: every decoding step recomputes every context (what the KV cache saves)
  d   Ray Serve, one replica holding the same `CausalLM` object, `@serve.batch(max_batch_size,
      batch_wait_timeout_s)` set to the same numbers; the batch method is an async generator that runs one
      decoding step per iteration (in a worker thread, as Tandem does) and streams each token to its
      caller, so a batch runs until its longest sequence ends and new requests wait for the next batch
      (Ray Serve's request-level batching)

The model: a checkpoint in the training workload's own format (`tandem/workloads/train/checkpoint.py`,
the layout `load_for_inference` reads), random weights of the built-in GPT `--size` (seeded), written once
into --work-dir (or pass --checkpoint). Its EOS row of the (tied) embedding is zero, so EOS's logit is
exactly 0 and greedy decoding never picks it over the 256 byte tokens: every request generates exactly
--max-tokens tokens (checked on each server before its sweep). Every request: one prompt of
--prompt-tokens bytes (byte tokenizer: one token per byte), `max_tokens` = --max-tokens, temperature 0
(greedy, so every variant does the same work and gives the same text).

Load: `tandem.workloads.serve.loadgen` (open loop, --clients processes, keep-alive HTTP/1.1; latency counted
from each request's scheduled send time). A fraction (--stream-fraction) of the requests at each rate is
sent by a small open-loop client in this process with `"stream": true`, which records time to first token
(first SSE event with text) besides the full latency; the full latencies of both kinds are merged. A sweep
stops one rate after the server saturates (throughput < 90% of the offered rate, or p99 > 10x the SLO).
Each server gets one second of load before its sweep and no other warm-up: shapes it has not seen yet are
prepared during the sweep, as in production (on an H200 with torch 2.11, cuDNN attention spends ~50 ms on
each new (batch, width) of a decoding step, against ~3 ms for the step itself; (a) repeats one set of shapes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import LoadGenerator, LoadResult, percentile, request_bytes
from serverprocess import ServerProcess

PATH = "/v1/completions"
MODEL_NAME = "gpt"
LABELS = {
    "a": "(a) model ceiling, no server",
    "s": "(s) Tandem scheduler in-process, no HTTP",
    "b": "(b) Tandem, batching off",
    "c": "(c) Tandem, continuous batching",
    "n": "(n) Tandem, continuous batching, KV cache off",
    "d": "(d) Ray Serve, @serve.batch",
}  # plus cN (N = 2..16): c with `--workers N`, N server processes on one port
SENTENCES = [
    "Kubernetes schedules pods onto nodes with free GPUs. ",
    "The batcher groups concurrent requests into one forward pass. ",
    "Inference is paid per query, forever. ",
    "A training job writes a checkpoint every few hundred steps. ",
    "Once upon a time there was a small language model. ",
    "The operator reconciles desired state with observed state. ",
    "Latency is a distribution, not a number. ",
    "Each decoding step appends one token to every sequence. ",
]


def prompts(count: int, tokens: int) -> list[str]:
    """`count` different ASCII prompts of exactly `tokens` bytes (= tokens for the byte tokenizer)."""
    out = []
    for i in range(count):
        text = "".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(tokens // 20 + 2))
        out.append(text[:tokens])
    return out


# -- the model ------------------------------------------------------------------------------------------


def write_checkpoint(root: Path, size: str, seed: int, *, greedy_below: int | None = None) -> Path:
    """A random-weight GPT of `size` as a Tandem training checkpoint under `root` (reused if there).

    `greedy_below`: also zero the (tied) embedding rows of the byte ids from this one up, so their logits
    are exactly 0 and greedy decoding picks an id below it (128: ASCII, one character per token, so a
    served answer's text gives back its token ids)."""
    from tandem.workloads.train import checkpoint as ckpt

    found = ckpt.latest_complete(root) if root.is_dir() else None
    if found is not None:
        meta = ckpt.read_metadata(found.path)
        same = meta.get("seed") == seed and meta.get("greedy_below") == greedy_below
        if meta.get("model", {}).get("size") == size and same:
            return found.path
        raise SystemExit(f"{root} holds another checkpoint ({meta.get('model')}); use another --work-dir")

    import torch

    from tandem.workloads.models.gpt import GPT, config_for
    from tandem.workloads.models.tokenizer import ByteTokenizer

    torch.manual_seed(seed)
    config = config_for(size)
    model = GPT(config)
    tokenizer = ByteTokenizer()
    with torch.no_grad():
        model.wte.weight[tokenizer.eos_id].zero_()  # EOS logit = 0 < the best byte's: no early stop
        if greedy_below is not None:
            model.wte.weight[greedy_below : tokenizer.vocab_size].zero_()
    root.mkdir(parents=True, exist_ok=True)
    with ckpt.staging(root, 1) as st:
        st.save_torch(ckpt.MODEL_FILE, model.state_dict())
        ref = st.publish(
            {
                "job": "serve-lm-load",
                "seed": seed,
                "greedy_below": greedy_below,
                "precision": "fp32",
                "model": {
                    "family": "gpt",
                    "size": size,
                    "config": config.to_dict(),
                    "parameters": model.num_parameters(),
                },
                "tokenizer": tokenizer.to_dict(),
            }
        )
    return ref.path


def load_lm(checkpoint: Path, device: str, precision: str) -> Any:
    from tandem.api.serving import ServingPrecision as Precision
    from tandem.workloads.serve.model import ModelOptions
    from tandem.workloads.serve.runtimes.causal_lm import CausalLM

    lm = CausalLM(ModelOptions(MODEL_NAME, checkpoint, device, Precision(precision)))
    lm.load()
    return lm


def generate_batch(lm: Any, prompt_ids: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy generation of a static batch with the runtime's decoding step, as the scheduler drives it
    (`generation.GenerationScheduler._step` / `_advance`): one `step` for every live sequence, append the
    token, drop finished ones. Returns each sequence's generated ids."""
    from tandem.workloads.serve.generation import GenSequence, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    seqs = [GenSequence(list(ids), params, i, len(ids)) for i, ids in enumerate(prompt_ids)]
    live = list(seqs)
    while live:
        tokens = lm.step(live)
        for seq, token in zip(live, tokens, strict=True):
            if lm.eos_id is not None and token == lm.eos_id:
                seq.finish_reason = "stop"
                continue
            seq.ids.append(token)
            seq.generated += 1
            if seq.generated >= max_tokens:
                seq.finish_reason = "length"
        live = [s for s in live if s.finish_reason is None]
    return [s.ids[s.prompt_tokens :] for s in seqs]


def model_ceiling(lm: Any, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Variant (a): static batches of --max-batch-size prompts, generated in a loop for --duration-s."""
    batch = [lm.encode(texts[i % len(texts)]) for i in range(args.max_batch_size)]
    generate_batch(lm, batch, args.max_tokens)  # warm-up at full size and length
    sync = _synchronize(args.device)
    done = tokens = batches = 0
    started = time.perf_counter()
    while batches < 2 or time.perf_counter() - started < args.duration_s:
        out = generate_batch(lm, batch, args.max_tokens)
        sync()
        done += len(out)
        tokens += sum(len(o) for o in out)
        batches += 1
    seconds = time.perf_counter() - started
    return {
        "requests_per_s": done / seconds,
        "tokens_per_s": tokens / seconds,
        "batch_seconds": seconds / batches,
        "batches": batches,
        "step_ms": 1000 * seconds / batches / args.max_tokens,
    }


def _synchronize(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


class _NullObserver:
    """Every GenerationObserver hook, doing nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        def nothing(*args: Any, **kwargs: Any) -> None:
            return None

        setattr(self, name, nothing)  # found directly from now on (the scheduler calls some per step)
        return nothing


def scheduler_ceiling(lm: Any, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Variant (s): Tandem's GenerationScheduler fed a backlog (8 batches' worth at once), no HTTP."""
    from tandem.workloads.serve.batcher import BatchingConfig
    from tandem.workloads.serve.generation import GenerationScheduler, SamplingParams, collect

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    config = BatchingConfig(
        max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=100_000
    )

    async def run() -> tuple[int, int, float]:
        scheduler = GenerationScheduler(lm, config, _NullObserver())
        scheduler.start()
        ids = [lm.encode(t) for t in texts]

        async def backlog(count: int) -> tuple[int, int]:
            handles = [scheduler.submit([ids[i % len(ids)]], params, stream=False) for i in range(count)]
            results = await asyncio.gather(*(collect(h, 1, None) for h in handles))
            return len(results), sum(r[0].completion_tokens for r in results)

        await backlog(args.max_batch_size)  # warm-up
        started = time.perf_counter()
        requests = tokens = 0
        while requests < 8 * args.max_batch_size or time.perf_counter() - started < args.duration_s:
            r, t = await backlog(8 * args.max_batch_size)
            requests, tokens = requests + r, tokens + t
        seconds = time.perf_counter() - started
        await scheduler.close(drain=False)
        return requests, tokens, seconds

    requests, tokens, seconds = asyncio.run(run())
    return {"requests_per_s": requests / seconds, "tokens_per_s": tokens / seconds}


def table_variants(table: dict[str, float]) -> list[str]:
    """The multi-worker variants (c2, c4, ...) present in a result table."""
    return [v for v in table if re.fullmatch(r"c\d+", v)]


# -- the servers ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tandem(
    checkpoint: Path, args: argparse.Namespace, batch: int, workers: int = 1, kv_cache: str = "on"
) -> Iterator[str]:
    server_args = [
        "--kv-cache", kv_cache,
        "--workers", str(workers),
        "--runtime", "causal-lm", "--model-uri", str(checkpoint), "--model-name", MODEL_NAME,
        "--device", args.device, "--precision", args.precision, "--max-batch-size", str(batch),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--max-queue-size", "100000",
        "--request-timeout-s", "300", "--log-level", "warning",
    ]  # fmt: skip
    with ServerProcess(server_args, startup_timeout_s=600) as server:
        yield server.url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def build_ray_app(checkpoint: Path, args: argparse.Namespace) -> Any:
    """Variant (d): the same CausalLM behind Ray Serve, `@serve.batch` over an async generator."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    device, precision = args.device, args.precision
    batch_size, wait_s = args.max_batch_size, args.max_queue_delay_ms / 1000
    # Ray's type hints do not cover batched async generators.
    batched: Any = serve.batch(max_batch_size=batch_size, batch_wait_timeout_s=wait_s)

    @serve.deployment(
        max_ongoing_requests=max(1000, 8 * batch_size),
        # On CPU the replica gets every core (Ray sets its torch threads from num_cpus), like `tandem serve`.
        ray_actor_options=(
            {"num_cpus": 1, "num_gpus": 1}
            if device.startswith("cuda")
            else {"num_cpus": len(os.sched_getaffinity(0))}
        ),
    )
    class Completions:
        def __init__(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            self.lm = load_lm(checkpoint, device, precision)
            self.lm.warm_up(batch_size)
            self.executor = ThreadPoolExecutor(max_workers=1)

        @batched  # type: ignore[untyped-decorator]
        async def generate(self, requests: list[tuple[list[int], int]]) -> AsyncIterator[list[Any]]:
            from tandem.workloads.serve.generation import GenSequence, SamplingParams

            loop = asyncio.get_running_loop()
            seqs = [
                GenSequence(list(ids), SamplingParams(max_tokens=n, temperature=0.0), i, len(ids))
                for i, (ids, n) in enumerate(requests)
            ]
            live = list(seqs)
            while live:
                tokens = await loop.run_in_executor(self.executor, self.lm.step, live)
                out: list[Any] = [StopIteration] * len(seqs)  # finished: ends that caller's stream
                for seq, token in zip(live, tokens, strict=True):
                    if self.lm.eos_id is not None and token == self.lm.eos_id:
                        seq.finish_reason = "stop"
                        continue
                    seq.ids.append(token)
                    seq.generated += 1
                    out[seq.index] = token
                    if seq.generated >= seq.params.max_tokens:
                        seq.finish_reason = "length"
                live = [s for s in live if s.finish_reason is None]
                yield out

        async def __call__(self, request: Request) -> Any:
            body = await request.json()
            ids = self.lm.encode(body["prompt"])
            max_tokens = int(body.get("max_tokens", 16))
            head = {"id": "cmpl-ray", "object": "text_completion", "created": int(time.time()),
                    "model": MODEL_NAME}  # fmt: skip

            def usage(generated: int) -> dict[str, int]:
                return {"prompt_tokens": len(ids), "completion_tokens": generated,
                        "total_tokens": len(ids) + generated}  # fmt: skip

            if body.get("stream"):

                async def events() -> AsyncIterator[bytes]:
                    generated = 0
                    async for token in self.generate((ids, max_tokens)):
                        generated += 1
                        reason = "length" if generated >= max_tokens else None
                        text = self.lm.decode([token])
                        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
                        yield _sse({**head, "choices": [choice]})
                    yield _sse({**head, "choices": [], "usage": usage(generated)})
                    yield b"data: [DONE]\n\n"

                return StreamingResponse(events(), media_type="text/event-stream")
            tokens = [t async for t in self.generate((ids, max_tokens))]
            reason = "length" if len(tokens) >= max_tokens else "stop"
            choice = {"text": self.lm.decode(tokens), "index": 0, "logprobs": None, "finish_reason": reason}
            return JSONResponse({**head, "choices": [choice], "usage": usage(len(tokens))})

    return Completions.bind()  # type: ignore[attr-defined]


@contextlib.contextmanager
def ray_serve(checkpoint: Path, args: argparse.Namespace) -> Iterator[str]:
    """Start Ray (local), Serve on a free loopback port and the deployment; yield the base URL."""
    import ray
    from ray import serve

    port = free_port()
    options: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        import torch

        options["num_gpus"] = torch.cuda.device_count()
    ray.init(
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        object_store_memory=256 << 20,
        **options,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        app = build_ray_app(checkpoint, args)
        serve.run(app, name="bench", route_prefix=PATH, logging_config={"log_level": "WARNING"})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


# -- streamed requests: time to first token -------------------------------------------------------------


@dataclass
class StreamResult:
    sent: int = 0
    ok: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failed: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    finished: float = 0.0


class StreamClient:
    """Open-loop streamed requests from a thread of this process (one connection per request, read to the
    end): time to the first SSE event that carries text, and the full latency, both from the scheduled
    send time; inter-token latency: the gaps between reads that carry text events (events that arrive
    together count as one read, so a gap may span several tokens: an upper bound)."""

    def __init__(self, url: str, bodies: list[bytes], rate: float, seconds: float, start: float) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.requests = [  # one connection per request: the server closes it after the reply
            request_bytes(self.host, self.port, "POST", PATH, b).replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1
            )
            for b in bodies
        ]
        self.rate, self.total, self.start = rate, max(1, round(rate * seconds)), start
        self.result = StreamResult()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> StreamClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()

    async def _main(self) -> None:
        tasks = []
        for i in range(self.total):
            scheduled = self.start + i / self.rate
            await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
            tasks.append(asyncio.create_task(self._one(self.requests[i % len(self.requests)], scheduled)))
        await asyncio.gather(*tasks)
        self.result.sent = self.total
        self.result.finished = time.monotonic()

    async def _one(self, data: bytes, scheduled: float) -> None:
        result = self.result
        try:
            async with asyncio.timeout(300):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(data)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    first, seen = 0.0, b""
                    stamps: list[float] = []
                    while chunk := await reader.read(1 << 16):
                        if not first:
                            seen = seen[-64:] + chunk
                            if b'"choices":[{' in seen:
                                first = time.monotonic()
                        if first and b'"text":"' in chunk and b'"text":""' not in chunk:
                            stamps.append(time.monotonic())
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            result.failed += 1
            return
        if status != 200:
            result.statuses[status] = result.statuses.get(status, 0) + 1
            return
        result.ok += 1
        result.latencies_s.append(time.monotonic() - scheduled)
        result.ttft_s.append((first or time.monotonic()) - scheduled)
        result.itl_s.extend(b - a for a, b in itertools.pairwise(stamps))


# -- sweeps -----------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One rate: the load generator's result merged with the streamed requests'."""

    load: LoadResult
    ttft_s: list[float]
    itl_s: list[float] = field(default_factory=list)

    def row(self, max_tokens: int) -> dict[str, Any]:
        r = self.load
        return {
            "rate": r.rate,
            "sent": r.sent,
            "ok": r.ok,
            "errors": r.errors,
            "statuses": r.statuses,
            "seconds": r.seconds,
            "requests_per_s": r.throughput,
            "tokens_per_s": r.throughput * max_tokens,
            "p50_ms": r.p50_ms,
            "p90_ms": r.percentile_ms(0.9),
            "p99_ms": r.p99_ms,
            "streamed": len(self.ttft_s),
            "ttft_p50_ms": 1000 * percentile(self.ttft_s, 0.5),
            "ttft_p99_ms": 1000 * percentile(self.ttft_s, 0.99),
            "itl_p50_ms": 1000 * percentile(self.itl_s, 0.5),
            "itl_p99_ms": 1000 * percentile(self.itl_s, 0.99),
            "sender_late_ms": r.max_late_ms,
        }


@dataclass
class Sweep:
    variant: str
    points: list[Point] = field(default_factory=list)
    ceiling: dict[str, Any] | None = None  # variants a and s: no latency
    answers: dict[str, Any] = field(default_factory=dict)


def bodies(texts: list[str], max_tokens: int, stream: bool) -> list[bytes]:
    extra = {"stream": True} if stream else {}
    return [
        json.dumps({"prompt": t, "max_tokens": max_tokens, "temperature": 0, **extra}).encode() for t in texts
    ]


def check_answers(url: str, texts: list[str], max_tokens: int, reference: list[str] | None) -> dict[str, Any]:
    """One request per prompt: every answer must hold exactly max_tokens tokens; compare with (a)'s text."""
    counts, same = [], 0
    for i, body in enumerate(bodies(texts, max_tokens, False)):
        request = urllib.request.Request(url + PATH, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        counts.append(answer["usage"]["completion_tokens"])
        same += reference is not None and answer["choices"][0]["text"] == reference[i]
    return {"completion_tokens": counts, "same_text_as_a": same, "prompts": len(texts)}


def run_rate(gen: LoadGenerator, url: str, texts: list[str], rate: float, args: argparse.Namespace) -> Point:
    streamed = rate * args.stream_fraction
    if streamed * args.duration_s < 0.5:
        return Point(
            gen.run(url, PATH, bodies(texts, args.max_tokens, False), rate=rate, seconds=args.duration_s), []
        )
    start = time.monotonic() + 0.3  # the load generator's own clock starts 0.3 s after run()
    with StreamClient(url, bodies(texts, args.max_tokens, True), streamed, args.duration_s, start) as client:
        load = gen.run(
            url, PATH, bodies(texts, args.max_tokens, False), rate=rate - streamed, seconds=args.duration_s
        )
    s = client.result
    statuses = dict(load.statuses)
    for code, count in s.statuses.items():
        statuses[code] = statuses.get(code, 0) + count
    merged = LoadResult(
        rate=rate,
        seconds=max(load.seconds, s.finished - start, (load.sent + s.sent) / rate),
        sent=load.sent + s.sent,
        ok=load.ok + s.ok,
        statuses=statuses,
        failed=load.failed + s.failed,
        latencies_s=[*load.latencies_s, *s.latencies_s],
        max_late_ms=load.max_late_ms,
        connections=load.connections + s.sent,
    )
    return Point(merged, s.ttft_s, s.itl_s)


def summary(p: Point) -> str:
    ttft = ""
    if p.ttft_s:
        p50, p99 = (1000 * percentile(p.ttft_s, q) for q in (0.5, 0.99))
        ttft = f", TTFT p50 {p50:.0f} / p99 {p99:.0f} ms"
    return p.load.summary() + ttft


def sweep(
    variant: str,
    start: Callable[[], AbstractContextManager[str]],
    gen: LoadGenerator,
    texts: list[str],
    reference: list[str] | None,
    args: argparse.Namespace,
) -> Sweep:
    print(f"{LABELS[variant]} ...", flush=True)
    result = Sweep(variant)
    with start() as url:
        result.answers = check_answers(url, texts, args.max_tokens, reference)
        print(f"  answers: {result.answers}", flush=True)
        gen.run(
            url, PATH, bodies(texts, args.max_tokens, False), rate=min(args.rates[0], 4), seconds=1
        )  # warm
        for rate in args.rates:
            point = run_rate(gen, url, texts, rate, args)
            result.points.append(point)
            print(f"  {summary(point)}", flush=True)
            r = point.load
            if r.throughput < 0.9 * rate or r.p99_ms > 10 * args.slo_ms:
                break  # saturated: higher rates only grow the queue
    return result


def best(s: Sweep, slo_ms: float) -> Point | None:
    """The highest rate fully answered (>= 99% of the requests sent, no errors) with p99 within the SLO.

    Open loop: requests leave on schedule, so a server that falls behind shows it in its latency. Its
    rate is the offered one (answers per scheduled second), not replies over the window plus the last
    reply's latency, which undercounts a 0.5 s request by 10% in a 5 s window.
    """
    fitting = [
        p
        for p in s.points
        if p.load.p99_ms <= slo_ms and not p.load.errors and p.load.ok >= 0.99 * p.load.sent
    ]
    return max(fitting, key=sustained, default=None)


def sustained(p: Point) -> float:
    """Answers per scheduled second at this point."""
    return p.load.ok * p.load.rate / p.load.sent if p.load.sent else 0.0


def saturation(s: Sweep) -> float:
    """The most requests/s answered at any rate (the server's throughput once it cannot keep up)."""
    return max((p.load.throughput for p in s.points), default=0.0)


# -- report -----------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0))
    return f"{cores} cores ({cpu}), {platform.python_implementation()} {platform.python_version()}"


def _ms(value: float) -> str:
    return "" if math.isnan(value) else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def report(
    sweeps: list[Sweep], args: argparse.Namespace, device_name: str, model: dict[str, Any]
) -> dict[str, Any]:
    mt = args.max_tokens
    print(f"\n## causal-lm serving benchmark, {datetime.date.today().isoformat()}")
    print(f"machine: {machine()}; device: {device_name}; load generator: {args.clients} process(es)")
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: GPT {args.size} ({model.get('parameters', 0) / 1e6:.1f}M parameters, random weights), "
        f"{args.precision}; requests: {args.prompt_tokens}-token prompt, max_tokens {mt}, temperature 0; "
        f"batching: max batch {args.max_batch_size}, delay {args.max_queue_delay_ms:g} ms; "
        f"SLO: p99 of the full request <= {args.slo_ms:g} ms; {args.duration_s:g} s per rate; "
        f"{100 * args.stream_fraction:g}% of requests streamed (TTFT)\n"
    )
    print(
        "| variant | max req/s with p99 <= SLO | tokens/s there | p50 ms | p99 ms | TTFT p50 / p99 ms "
        "| at saturation: req/s (tokens/s) |"
    )
    print("|---|---|---|---|---|---|---|")
    at_slo: dict[str, float] = {}
    at_sat: dict[str, float] = {}
    out: dict[str, Any] = {}
    for s in sweeps:
        if s.ceiling is not None:
            at_slo[s.variant] = at_sat[s.variant] = s.ceiling["requests_per_s"]
            c = s.ceiling
            print(
                f"| {LABELS[s.variant]} | | | | | | {c['requests_per_s']:,.1f} ({c['tokens_per_s']:,.0f}) |"
            )
            out[s.variant] = {"label": LABELS[s.variant], "ceiling": c}
            continue
        b = best(s, args.slo_ms)
        at_slo[s.variant] = sustained(b) if b else 0.0
        at_sat[s.variant] = saturation(s)
        if b:
            row = b.row(mt)
            ttft = f"{_ms(row['ttft_p50_ms'])} / {_ms(row['ttft_p99_ms'])}" if b.ttft_s else ""
            cells = (
                f"{at_slo[s.variant]:,.1f} | {at_slo[s.variant] * mt:,.0f} | {_ms(row['p50_ms'])} | "
                f"{_ms(row['p99_ms'])} | {ttft}"
            )
        else:
            cells = "none | | | | "
        print(f"| {LABELS[s.variant]} | {cells} | {at_sat[s.variant]:,.1f} ({at_sat[s.variant] * mt:,.0f}) |")
        out[s.variant] = {
            "label": LABELS[s.variant],
            "answers": s.answers,
            "points": [p.row(mt) for p in s.points],
            "best_under_slo": b.row(mt) if b else None,
            "saturation_requests_per_s": at_sat[s.variant],
        }
    print(
        "\n| variant | rate/s | ok/s | tokens/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | "
        "ITL p50 ms | ITL p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sweeps:
        for p in s.points:
            row = p.row(mt)
            print(
                f"| {s.variant} | {row['rate']:g} | {row['requests_per_s']:,.1f} | "
                f"{row['tokens_per_s']:,.0f} | {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | "
                f"{_ms(row['ttft_p50_ms'])} | {_ms(row['ttft_p99_ms'])} | {_ms(row['itl_p50_ms'])} | "
                f"{_ms(row['itl_p99_ms'])} | {row['errors']} |"
            )
    print()
    ratios: dict[str, float] = {}
    for name, top, bottom, table, unit in [
        ("c/b at SLO (goal >= 3x)", "c", "b", at_slo, "x"),
        ("c/a at saturation (goal >= 85%)", "c", "a", at_sat, "%"),
        ("c/a at SLO", "c", "a", at_slo, "%"),
        ("c/d at SLO (goal > 1x)", "c", "d", at_slo, "x"),
        ("c/d at saturation", "c", "d", at_sat, "x"),
        ("s/a (scheduler, no HTTP)", "s", "a", at_sat, "%"),
        ("c/s at saturation (HTTP one process / scheduler in process, goal >= 85%)", "c", "s", at_sat, "%"),
        *[(f"{v}/a at saturation", v, "a", at_sat, "%") for v in table_variants(at_sat)],
        *[(f"{v}/a at SLO", v, "a", at_slo, "%") for v in table_variants(at_slo)],
    ]:
        if table.get(top) and table.get(bottom):
            value = table[top] / table[bottom]
            ratios[name] = value
            print(
                f"({top})/({bottom}) {name.split(' ', 1)[1]}: "
                + (f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x")
            )
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "device": device_name,
        "command": " ".join(sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": model,
        "variants": out,
        "ratios": ratios,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the servers and the ceiling)")
    parser.add_argument("--size", default="tiny", help="built-in GPT size: tiny, small, medium, 124m")
    parser.add_argument(
        "--precision",
        default="auto",
        help="fp32, bf16, fp16 (GPU), int8 (CPU); auto = bf16 on GPU, else fp32",
    )
    parser.add_argument("--rates", default="2,4,8,16,32,64", help="req/s, ascending")
    parser.add_argument("--variants", default="a,b,c,d", help=f"comma-separated, of {','.join(LABELS)}")
    parser.add_argument("--slo-ms", type=float, default=2000.0, help="p99 goal of the full request latency")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument(
        "--stream-fraction", type=float, default=0.1, help="share of requests sent streamed (TTFT); 0 = none"
    )
    parser.add_argument("--checkpoint", type=Path, help="a Tandem GPT checkpoint (default: write one)")
    parser.add_argument("--work-dir", type=Path, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in args.variants:
        if (workers := re.fullmatch(r"c([2-9]|1[0-6])", variant)) is not None:
            LABELS[variant] = f"(c{workers[1]}) Tandem, continuous batching, {workers[1]} workers"
    unknown = set(args.variants) - set(LABELS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(LABELS)}")
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if not 0 <= args.stream_fraction < 1:
        parser.error("--stream-fraction must be in [0, 1)")
    return args


def in_process(
    checkpoint: Path, texts: list[str], args: argparse.Namespace
) -> tuple[list[Sweep], dict[str, Any], list[str]]:
    """Variants (a) and (s) with the model in this process; also the reference answers and metadata."""
    lm = load_lm(checkpoint, args.device, args.precision)
    model: dict[str, Any] = lm.metadata()
    if args.prompt_tokens + args.max_tokens > lm.block_size:
        print(f"note: prompt + max_tokens > block_size {lm.block_size}: the context window slides")
    generated = generate_batch(lm, [lm.encode(t) for t in texts], args.max_tokens)
    reference = [lm.decode(ids) for ids in generated]
    sweeps = []
    for variant in [v for v in args.variants if v in ("a", "s")]:
        print(f"{LABELS[variant]} ...", flush=True)
        lm.warm_up(args.max_batch_size)
        ceiling = (model_ceiling if variant == "a" else scheduler_ceiling)(lm, texts, args)
        print(f"  {ceiling['requests_per_s']:.1f} req/s, {ceiling['tokens_per_s']:,.0f} tokens/s", flush=True)
        sweeps.append(Sweep(variant, ceiling=ceiling))
    del lm
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return sweeps, model, reference


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = "CPU"
    scratch = None
    if args.checkpoint is None and args.work_dir is None:
        scratch = tempfile.mkdtemp(prefix="serve-lm-load-")
        args.work_dir = Path(scratch)
    try:
        checkpoint = args.checkpoint or write_checkpoint(
            args.work_dir / f"gpt-{args.size}", args.size, args.seed
        )
        print(f"checkpoint: {checkpoint}", flush=True)
        texts = prompts(8, args.prompt_tokens)
        sweeps, model, reference = in_process(checkpoint, texts, args)
        starts: dict[str, Callable[[], AbstractContextManager[str]]] = {
            "b": lambda: tandem(checkpoint, args, 1),
            "c": lambda: tandem(checkpoint, args, args.max_batch_size),
            "n": lambda: tandem(checkpoint, args, args.max_batch_size, kv_cache="off"),
            "d": lambda: ray_serve(checkpoint, args),
            **{
                v: functools.partial(tandem, checkpoint, args, args.max_batch_size, int(v[1:]))
                for v in args.variants
                if re.fullmatch(r"c\d+", v)
            },
        }
        with LoadGenerator(args.clients, timeout_s=300) as gen:
            for variant in [v for v in args.variants if v in starts]:
                sweeps.append(sweep(variant, starts[variant], gen, texts, reference, args))
        order = {v: i for i, v in enumerate(LABELS)}
        results = report(sorted(sweeps, key=lambda s: order[s.variant]), args, device_name, model)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(f"\nresults: {args.out}")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
