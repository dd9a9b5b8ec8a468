"""Generation at mixed answer lengths: HF transformers `generate`, Tandem's scheduler in process, Tandem's
HTTP server (one or several processes) and the decoding floor, on one request set, in one run.

    python bench/serve_lm_mixed.py --device cuda --size 124m --precision bf16 \\
        --variants hf1,hf32,hf32s,s256,m256,c1,c1-si5,c4-b64,f,g                      # one GPU
    .venv/bin/python bench/serve_lm_mixed.py --size tiny --requests 32 --max-answer 48 \\
        --variants hf1,hf32,hf32s,s32,m32,c1,o32,f                                     # CPU smoke run
    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_lm_mixed.py --size tiny --requests 512 \\
        --prompt-tokens 16 --fake-step-ms 0.5 --variants m256,c1,c1-before --before DIR  # the server's costs

The request set: --requests prompts of --prompt-tokens random printable bytes (the byte tokenizer: one token
each), answers of uniform random length in --min-answer..--max-answer tokens (seeded), all queued at once,
greedy. The model: the built-in GPT `--size` with random weights (seeded; the embedding rows of EOS and of
the byte ids from --vocab up zeroed, so greedy never ends early and picks an id below --vocab: 128, ASCII,
one character per token, so a served answer's text gives its token ids back), written as a Tandem
checkpoint and served by the causal-lm runtime; HF's `GPT2LMHeadModel` gets the same weights (GPT-2's
architecture: the same model), and generation is limited to the first --vocab ids in process. Every request
must produce exactly its answer length (checked, or the run fails). Useful tokens count each request's own
answer only (a static batch padded to its longest answer computes more).

Variants (--variants, comma-separated; N a batch size):
- hf1: HF `generate`, one request at a time (the first --hf1-requests requests, for time).
- hf32 / hf32s: HF `generate`, static batches of 32 in arrival order / sorted by answer length (an oracle).
- sN: Tandem's generation scheduler in process (`GenerationScheduler`, every request streamed so each token
  is timed), at most N sequences in flight, the runtime's defaults (on CUDA: CUDA graphs).
- mN: sN with one request in --stream-every streamed and the others answered whole (one event at the end,
  no token times), as the HTTP variants send them: the in-process reference for cK.
- cK: `tandem serve` with K processes (`--workers`, K 1-16), --http-batch sequences in flight each, the
  request set sent at once over keep-alive HTTP/1.1 connections from this process (one in --stream-every
  streamed, SSE read chunk by chunk), after one untimed pass; then, on the same server, the set repeated
  --half-repeat times in open loop at half the rate the burst reached ("cK at half": TTFT and ITL of the
  streamed requests from each request's due time, i.e. at half of saturation). Every answer is checked
  (finish reason, usage and text) to hold exactly its tokens. Reported besides: the server processes' CPU
  seconds for the burst and, with K = 1, its decoding steps (from /metrics). `cK-before`: served from the
  older copy of the package in --before DIR (`git archive COMMIT tandem | tar -x -C DIR`); `cK-siMS`: with
  the GIL switch interval MS ms instead of the server's own (`bench/serve_variant.py`); `cK-bN`: N
  sequences in flight in each process instead of --http-batch (four processes of 256 need four KV caches).
  Options combine: `c1-before-si5`, `c4-b64`.
- nN: sN without launching the next decoding pass ahead (`DecodeCache.greedy_step` as `step(...).greedy()`).
- eN: the same as sN without CUDA graphs (the decoding pass launched op by op).
- oN: the same as eN with the old mixed step: a step in which sequences join recomputes every row's whole
  context (`one_pass`, the code before issue 17).
- g: a check, not a timing: an fp32 copy of the model through the runtime's cache (on CUDA, its graphs)
  while sequences join and leave, every step's logits against the model's own forward pass.
- f: the floor at the largest sN's batch: a static batch decoded by the runtime's cache with nobody joining
  or leaving (steps at contexts prompt..prompt+max-answer), and the same captured graph replayed alone at
  the widest context (f0: no CPU work between steps but the replay); fm: the request set itself (its first
  N) through the runtime's cache alone, all at once, each request leaving after its answer (the sN run
  without the scheduler: its batch drains as answers end).

Each Tandem variant runs once untimed first (it captures the CUDA graphs it meets), then timed. Reported:
useful tokens/s, time to first token (TTFT) p50/p99 from the moment all requests were queued, inter-token
latency (ITL) p50/p99 over every pair of consecutive tokens of a request. HF's token times come from a
logits processor called once per step (the step's start: HF synchronises every step), so they are
approximate within one step. The timed sN runs are split into the model step (CPU launch and waiting for
the GPU) and the rest (the scheduler and event loop); `--profile` prints cProfile's top functions of one more
run, for the event loop's thread and the model step's worker thread apart (Python 3.12+: one profile of
every thread, as its profiler sees them all). bf16 agreement: each
variant's answers are compared with the first full-set variant's (greedy: a near-tie can flip in another
summation order; the median position of the first difference is given). At the end: each HTTP burst's
tokens/s against each in-process one (the goal: c1 >= 85% of m256).

--fake-step-ms MS replaces the model's decoding step, in process and in the servers, by a GIL-free sleep of
MS ms and a token computed from the context (`bench/serve_variant.py`): on a CPU, the regime of a GPU where
the server's own costs decide (HF variants are refused with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import cProfile
import gc
import io
import itertools
import os
import platform
import pstats
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_lm_load import _NullObserver, load_lm, write_checkpoint
from serve_variant import STEP_MS_ENV, SWITCH_MS_ENV, use_fake_step
from serverprocess import ServerProcess

from tandem.workloads.serve.runtimes.kv_cache import DecodeCache

#: cK[-before][-siMS][-bN]: `tandem serve` with K processes, optionally --before's package, the GIL
#: switch interval MS ms instead of the server's own setting, N sequences in flight in each process.
HTTP_VARIANT = re.compile(r"c([1-9]|1[0-6])(-before)?(-si[0-9.]+)?(-b[0-9]+)?")


@dataclass
class Request:
    prompt: list[int]
    answer: int


@dataclass
class Outcome:
    """One variant's run: each request's tokens and their times (seconds after all were queued)."""

    seconds: float
    tokens: list[list[int]]
    times: list[list[float]]
    notes: dict[str, Any] = field(default_factory=dict)


def request_set(args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)
    printable = list(range(32, 127))
    return [
        Request(
            [rng.choice(printable) for _ in range(args.prompt_tokens)],
            rng.randint(args.min_answer, args.max_answer),
        )
        for _ in range(args.requests)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")
    )


# -- HF transformers ------------------------------------------------------------------------------------


def hf_model(lm: Any, device: str, dtype: torch.dtype) -> Any:
    """HF's GPT2LMHeadModel with the Tandem GPT's weights (Conv1D stores Linear's weight transposed; Tandem's
    GPT has no biases: HF's are zero)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = lm.gpt
    c = gpt.config
    config = GPT2Config(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model: Any = GPT2LMHeadModel(config)
    ours = {k: v.float().cpu() for k, v in gpt.state_dict().items()}
    theirs = model.state_dict()
    parameters = dict(model.named_parameters())
    mapped: dict[str, torch.Tensor] = {}
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    for name, tensor in theirs.items():
        key = name.removeprefix("transformer.")
        if key in ours:
            module = name.rsplit(".", 1)[0]
            mapped[name] = ours[key].t() if module in conv1d and name.endswith(".weight") else ours[key]
        elif name in parameters:  # a bias
            mapped[name] = torch.zeros_like(tensor)
        else:
            mapped[name] = tensor  # attention's causal-mask buffers, where a version keeps them
    model.load_state_dict(mapped)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    moved = model.to(device=device, dtype=dtype)
    return moved.eval()


def hf_generate(
    model: Any, requests: list[Request], batches: list[list[int]], vocab: int, device: str
) -> Outcome:
    """Static batches (lists of request indices), one after another, each generated to its longest answer."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class TimedMask(LogitsProcessor):
        """Only the tokenizer's ids (as the runtime); records when each step's logits are handled."""

        def __init__(self) -> None:
            self.calls: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.calls.append(time.perf_counter())
            scores[:, vocab:] = -float("inf")
            return scores

    tokens: list[list[int]] = [[] for _ in requests]
    times: list[list[float]] = [[] for _ in requests]
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            longest = max(requests[i].answer for i in batch)
            ids = torch.tensor([requests[i].prompt for i in batch], device=device)
            timer = TimedMask()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=longest,
                min_new_tokens=longest,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([timer]),
            )
            ended = time.perf_counter()
            # Token k exists once step k + 1 starts (the last one when generate returns).
            stamps = [*timer.calls[1:], ended]
            for row, i in enumerate(batch):
                made = out[row, len(requests[i].prompt) :].tolist()
                if len(made) != longest:
                    raise SystemExit(f"HF generated {len(made)} tokens for request {i}, expected {longest}")
                tokens[i] = made[: requests[i].answer]
                times[i] = [t - started for t in stamps[: requests[i].answer]]
    return Outcome(time.perf_counter() - started, tokens, times)


# -- Tandem ---------------------------------------------------------------------------------------------


def set_cache(lm: Any, vocab: int, **options: Any) -> None:
    """The runtime's cache, rebuilt with other options (the variants' switch)."""
    lm._cache = DecodeCache(lm.gpt, vocab=vocab, **options)


def streamed(index: int, every: int) -> bool:
    """Whether request `index` is streamed when one in `every` is (0: none)."""
    return every > 0 and index % every == 0


def scheduler_run(lm: Any, requests: list[Request], max_batch: int, stream_every: int = 1) -> Outcome:
    """All requests submitted at once to an in-process GenerationScheduler; one in `stream_every` streamed
    (1: all, each token timed), the others collected whole (as the server answers them: one event at the
    end, no token times)."""
    from tandem.workloads.serve.batcher import BatchingConfig
    from tandem.workloads.serve.generation import GenerationScheduler, SamplingParams

    config = BatchingConfig(max_batch_size=max_batch, max_queue_delay_ms=1, max_queue_size=1_000_000)

    async def run() -> Outcome:
        scheduler = GenerationScheduler(lm, config, _NullObserver())
        scheduler.start()
        tokens: list[list[int]] = [[] for _ in requests]
        times: list[list[float]] = [[] for _ in requests]

        async def consume(i: int, handle: Any) -> None:
            timed = streamed(i, stream_every)
            while (event := await handle.next_event()) is not None:
                if timed:
                    now = time.perf_counter() - started
                    made = event.completion_tokens - len(times[i])
                    times[i] += [now] * made
                if event.finish_reason is not None:
                    if event.finish_reason != "length":
                        raise SystemExit(f"request {i} finished with {event.finish_reason!r}")
                    tokens[i] = handle._request.sequences[0].ids[len(requests[i].prompt) :]

        started = time.perf_counter()
        handles = [
            scheduler.submit(
                [r.prompt],
                SamplingParams(max_tokens=r.answer, temperature=0.0),
                stream=streamed(i, stream_every),
            )
            for i, r in enumerate(requests)
        ]
        await asyncio.gather(*(consume(i, h) for i, h in enumerate(handles)))
        seconds = time.perf_counter() - started
        await scheduler.close(drain=False)
        return Outcome(seconds, tokens, times)

    return asyncio.run(run())


# -- Tandem over HTTP -----------------------------------------------------------------------------------


class HttpClient:
    """Completions over keep-alive HTTP/1.1 connections (one request in flight on each, opened as needed
    and kept for the next run), written and parsed by hand on asyncio streams: a client library's own cost
    per request (httpx: ~1 ms of CPU) would be a large part of what is measured on a machine with few cores.
    Streamed answers are read chunk by chunk (each chunk is one write of the server: one or more SSE
    events), and every token of a chunk is stamped with the chunk's arrival."""

    KEEP_S = 3.0

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def complete(self, request: Request, stream: bool, due: float) -> tuple[list[int], list[float]]:
        """The answer's token ids (one ASCII character each) and, streamed, each token's arrival (seconds
        after `due`, a perf_counter time)."""
        body = orjson.dumps(
            {"prompt": bytes(request.prompt).decode("ascii"), "max_tokens": request.answer,
             "temperature": 0, "stream": stream}
        )  # fmt: skip
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        reader, writer = await self._connection()
        writer.write(head + body)
        try:
            received = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):  # a kept connection the server closed
            writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(head + body)
            received = await reader.readuntil(b"\r\n\r\n")
        lines = received.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        tokens: list[int] = []
        times: list[float] = []
        finish = None
        if "content-length" in fields:
            answer = orjson.loads(await reader.readexactly(int(fields["content-length"])))
            if status != 200:
                raise SystemExit(f"HTTP {status}: {answer}")
            choice = answer["choices"][0]
            tokens, finish = [ord(c) for c in choice["text"]], choice["finish_reason"]
            if answer["usage"]["completion_tokens"] != request.answer:
                raise SystemExit(f"usage says {answer['usage']} for an answer of {request.answer} tokens")
        else:  # chunked: the SSE stream
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                chunk = await reader.readexactly(size + 2)
                arrived = time.perf_counter() - due
                for line in chunk.split(b"\n"):
                    if not line.startswith(b"data: {"):
                        continue
                    event = orjson.loads(line[6:])
                    if "error" in event:
                        raise SystemExit(f"error in the stream: {event}")
                    for choice in event["choices"]:
                        tokens += [ord(c) for c in choice["text"]]
                        times += [arrived] * len(choice["text"])
                        finish = choice["finish_reason"] or finish
            await reader.readexactly(2)  # the last chunk's CRLF
        if finish != "length":
            raise SystemExit(
                f"an answer ended with {finish!r}, expected 'length' after {request.answer} tokens"
            )
        self._idle.append((reader, writer, time.monotonic()))
        return tokens, times

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle kept connection, or a new one (a connection idle for over `KEEP_S` is closed: the server
        closes idle connections after 5 s, uvicorn's default)."""
        while self._idle:
            reader, writer, since = self._idle.pop()
            if time.monotonic() - since < self.KEEP_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


async def http_run(
    client: HttpClient, requests: list[Request], stream_every: int, rate: float | None = None
) -> Outcome:
    """The requests through the server: all sent at once (`rate` None) or one every 1/`rate` s (open loop:
    each request's times count from its due time, so a server that falls behind shows it)."""
    tokens: list[list[int]] = [[] for _ in requests]
    times: list[list[float]] = [[] for _ in requests]
    # The client's own pauses would count as the server's latency: a full collection here scans every
    # earlier variant's results (this process keeps them all), so they are frozen out of it for the run
    # (one open-loop pass after the in-process variants once read TTFT p99 188 ms, its repeats 5 ms).
    gc.collect()
    gc.freeze()
    started = time.perf_counter()

    async def one(i: int) -> None:
        due = started + (i / rate if rate else 0.0)
        if rate:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tokens[i], times[i] = await client.complete(requests[i], streamed(i, stream_every), due)

    try:
        await asyncio.gather(*(one(i) for i in range(len(requests))))
    finally:
        gc.unfreeze()
    return Outcome(time.perf_counter() - started, tokens, times)


def steps_taken(server: ServerProcess) -> float:
    """Decoding steps the server has run so far (its batch-duration histogram's count)."""
    return server.metric("tandem_serve_batch_duration_seconds_count")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed_step(lm: Any) -> tuple[dict[str, float], Callable[[], None]]:
    """Wraps the runtime's step (contexts, the cache's step, the greedy ids back: CPU work and waiting for
    the GPU) and the cache's step (preparing inputs, launching or replaying, without waiting for the GPU) to
    add up their seconds; undo with the returned callable."""
    spent = {"step_s": 0.0, "cache_s": 0.0, "steps": 0.0}
    cache = lm._cache
    step_of, cache_step_of = lm.step, cache.step

    def step(batch: Any) -> list[int]:
        t = time.perf_counter()
        out: list[int] = step_of(batch)
        spent["step_s"] += time.perf_counter() - t
        spent["steps"] += 1
        return out

    def cache_step(owners: Any, contexts: Any) -> Any:
        t = time.perf_counter()
        out = cache_step_of(owners, contexts)
        spent["cache_s"] += time.perf_counter() - t
        return out

    lm.step, cache.step = step, cache_step

    def undo() -> None:
        del lm.step, cache.step

    return spent, undo


def floor(
    lm: Any, requests: list[Request], batch: int, steps: int, vocab: int, device: str
) -> dict[str, float]:
    """(f): a static batch through the runtime's cache, nobody joining or leaving; (f0): its widest captured
    graph replayed alone; (fm): the request set itself (the first `batch` requests) through the runtime's
    cache alone, all at once, each leaving after its answer: the scheduler's run without the scheduler."""
    cache = DecodeCache(lm.gpt, vocab=vocab)
    cache.reserve(batch)
    ids = [list(requests[i % len(requests)].prompt) for i in range(batch)]
    out: dict[str, float] = {}
    with torch.inference_mode():
        for timed in (False, True):  # the first pass captures the graphs
            sequences = [list(s) for s in ids]
            fresh = [object() for _ in range(batch)]  # the last pass's sequences leave
            for seq, token in zip(sequences, cache.step(fresh, sequences).greedy(), strict=True):
                seq.append(token)
            sync(device)
            started = time.perf_counter()
            for _ in range(steps - 1):
                for seq, token in zip(sequences, cache.step(fresh, sequences).greedy(), strict=True):
                    seq.append(token)
            sync(device)
            if timed:
                seconds = time.perf_counter() - started
                out["f_tokens_per_s"] = batch * (steps - 1) / seconds
                out["f_step_ms"] = 1000 * seconds / (steps - 1)
        chosen = requests[:batch]
        for timed in (False, True):
            live = [(object(), list(r.prompt), len(r.prompt) + r.answer) for r in chosen]
            sync(device)
            started = time.perf_counter()
            while live:
                owners, sequences = [o for o, _, _ in live], [s for _, s, _ in live]
                for seq, token in zip(sequences, cache.step(owners, sequences).greedy(), strict=True):
                    seq.append(token)
                live = [(o, s, end) for o, s, end in live if len(s) < end]
            sync(device)
            if timed:
                out["fm_tokens_per_s"] = sum(r.answer for r in chosen) / (time.perf_counter() - started)
        graphs = cache._graphs
        decoding = [k for k in graphs.graphs if k[0] == "decode"] if graphs is not None else []
        if graphs is not None and decoding:
            key = max(decoding)  # the widest graph of the largest batch
            graph = graphs.graphs[key]
            sync(device)
            started = time.perf_counter()
            for _ in range(100):
                graph.replay()
            sync(device)
            ms = 1000 * (time.perf_counter() - started) / 100
            out["f0_step_ms"] = ms
            out["f0_tokens_per_s"] = key[1] / ms * 1000
            out["f0_width"] = key[2]
        out["graphs"] = cache.graphs_captured
    return out


def graph_check(lm: Any, device: str) -> dict[str, Any]:
    """(g): fp32 copy of the model, sequences joining and leaving for 24 steps through the runtime's cache
    (on CUDA: its graphs); every other step's logits and every step's greedy choice against the model's own
    forward of each whole window (the steps in between are `greedy_step`s, which launch the next pass
    ahead)."""
    model = copy.deepcopy(lm.gpt).float()
    cache = DecodeCache(model, vocab=lm.vocab_size)
    rng = random.Random(1)
    seqs = [[rng.randrange(256) for _ in range(rng.randrange(8, 70))] for _ in range(5)]
    owners = [object() for _ in seqs]
    worst = 0.0
    same = total = 0
    with torch.inference_mode():
        for step in range(24):
            if step % 3 == 2:
                for _ in range(2):
                    k = rng.randrange(len(seqs))
                    del seqs[k], owners[k]
                for _ in range(3):
                    k = rng.randrange(len(seqs) + 1)
                    seqs.insert(k, [rng.randrange(256) for _ in range(rng.randrange(8, 70))])
                    owners.insert(k, object())
            logits: torch.Tensor | None = None
            if step % 2:  # greedy ids only; the next pass is launched ahead, and the next step uses it
                greedy = cache.greedy_step(owners, seqs)
            else:
                result = cache.step(owners, seqs)
                logits, greedy = result.logits(), result.greedy()
            for i, seq in enumerate(seqs):
                expected = model(torch.tensor([seq], device=device))[0][0, -1].float()
                if logits is not None:
                    worst = max(worst, float((logits[i] - expected).abs().max()))
                same += greedy[i] == int(expected[: lm.vocab_size].argmax())
                total += 1
                seq.append(greedy[i])
    return {
        "fp32_max_abs_logit_diff": worst,
        "fp32_greedy_same": f"{same}/{total}",
        "graphs": cache.graphs_captured,
    }


# -- report ---------------------------------------------------------------------------------------------


def summarize(
    name: str, outcome: Outcome, requests: list[Request], reference: Outcome | None
) -> dict[str, Any]:
    for i, (r, made) in enumerate(zip(requests, outcome.tokens, strict=True)):
        if len(made) != r.answer:
            raise SystemExit(f"{name}: request {i} got {len(made)} tokens, expected exactly {r.answer}")
    useful = sum(r.answer for r in requests)
    ttft = [t[0] for t in outcome.times if t]
    itl = [b - a for t in outcome.times for a, b in itertools.pairwise(t)]
    row: dict[str, Any] = {
        "variant": name,
        "tokens_per_s": useful / outcome.seconds,
        "seconds": outcome.seconds,
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "itl_p50_ms": 1000 * percentile(itl, 50),
        "itl_p99_ms": 1000 * percentile(itl, 99),
        **outcome.notes,
    }
    if reference is not None:
        pairs = list(zip(outcome.tokens, reference.tokens, strict=False))
        diverged = [
            next(k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y) for a, b in pairs if a != b
        ]
        row["same_answers"] = f"{len(pairs) - len(diverged)}/{len(pairs)}"
        row["first_difference_median"] = statistics.median(diverged) if diverged else None
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="124m", help="built-in GPT size: tiny, small, medium, 124m")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--min-answer", type=int, default=16)
    parser.add_argument("--max-answer", type=int, default=256)
    parser.add_argument("--variants", default="g,s256,hf1,hf32,hf32s,s32,e256,o32,f")
    parser.add_argument("--hf1-requests", type=int, default=16, help="hf1 runs only the first N requests")
    parser.add_argument("--profile", action="store_true", help="cProfile one more run of each sN")
    parser.add_argument(
        "--vocab",
        type=int,
        default=128,
        help="greedy chooses among ids below this (128: ASCII, so each token is one streamed character)",
    )
    parser.add_argument(
        "--stream-every",
        type=int,
        default=10,
        help="cK and mN stream one request in this many (10: 10%%), the others are answered whole",
    )
    parser.add_argument(
        "--http-batch", type=int, help="cK's --max-batch-size (default: the largest sN/mN, else 256)"
    )
    parser.add_argument(
        "--half-repeat",
        type=int,
        default=4,
        help="cK's open-loop run at half its rate sends the request set this many times",
    )
    parser.add_argument(
        "--before", type=Path, help="a folder holding an older copy of the `tandem` package, for cK-before"
    )
    parser.add_argument(
        "--fake-step-ms",
        type=float,
        help="replace the model's decoding step, in process and in the servers, by a sleep of this many ms "
        "and a token computed from the context (bench/serve_variant.py): the server's own costs in a "
        "GPU's regime on a CPU; HF variants are refused",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tandem-bench-lm-mixed"))
    return parser.parse_args()


class Bench:
    """The model, the request set and HF's copy of the model (made on first use)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.requests = request_set(args)
        self.checkpoint = write_checkpoint(
            args.work_dir / f"{args.size}-below{args.vocab}", args.size, args.seed, greedy_below=args.vocab
        )
        self.lm = load_lm(self.checkpoint, args.device, args.precision)
        if args.fake_step_ms is not None:
            use_fake_step(type(self.lm), args.fake_step_ms)
        if args.device.startswith("cuda"):
            torch.backends.cuda.enable_cudnn_sdp(False)  # as the runtime (load) does
        self.hf: Any = None
        try:
            import transformers

            self.hf_version: str | None = transformers.__version__
        except ImportError:
            self.hf_version = None

    def header(self) -> str:
        args, requests = self.args, self.requests
        cuda = args.device.startswith("cuda")
        card = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
        answers = sum(r.answer for r in requests)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        return (
            f"{args.size} ({self.lm.gpt.num_parameters() / 1e6:.1f}M parameters), {args.precision}, {card}, "
            f"torch {torch.__version__}, transformers {self.hf_version or 'not installed'}, {when}\n"
            f"{len(requests)} requests, {args.prompt_tokens}-token prompts, answers "
            f"{args.min_answer}..{args.max_answer} ({answers} useful tokens, mean "
            f"{answers / len(requests):.0f}), greedy, all queued at once\n"
        )

    def huggingface(self, name: str) -> tuple[Outcome, list[Request]] | None:
        args, requests = self.args, self.requests
        if self.hf_version is None:
            print(f"{name}: skipped (transformers is not installed)", flush=True)
            return None
        if self.hf is None:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
            self.hf = hf_model(self.lm, args.device, dtype)
            hf_generate(self.hf, requests[:2], [[0, 1]], args.vocab, args.device)  # warm-up
        if name == "hf1":
            subset = requests[: args.hf1_requests]
            return hf_generate(
                self.hf, subset, [[i] for i in range(len(subset))], args.vocab, args.device
            ), subset
        order = list(range(len(requests)))
        if name == "hf32s":
            order.sort(key=lambda i: requests[i].answer)
        batches = [order[k : k + 32] for k in range(0, len(order), 32)]
        return hf_generate(self.hf, requests, batches, args.vocab, args.device), requests

    def tandem(self, name: str) -> Outcome:
        args, requests, lm = self.args, self.requests, self.lm
        batch = int(name[1:])
        graphs = name[0] in "snm" and args.device.startswith("cuda")
        set_cache(lm, args.vocab, cuda_graphs=graphs, one_pass=name[0] == "o")
        if name[0] == "n":  # no pass launched ahead
            cache = lm._cache
            cache.greedy_step = lambda owners, contexts: cache.step(owners, contexts).greedy()
        lm._cache.reserve(batch)
        scheduler_run(lm, requests if graphs else requests[:batch], batch)  # warm-up (captures graphs)
        spent, undo = timed_step(lm)
        outcome = scheduler_run(lm, requests, batch, args.stream_every if name[0] == "m" else 1)
        undo()
        outcome.notes = {
            "in_model_step": f"{spent['step_s'] / outcome.seconds:.0%}",
            "in_cache_step_cpu": f"{spent['cache_s'] / outcome.seconds:.0%}",
            "steps": int(spent["steps"]),
            "ms_a_step": round(1000 * outcome.seconds / max(1, spent["steps"]), 2),
            "graphs": lm._cache.graphs_captured,
        }
        if args.profile and name[0] == "s":
            profiler, in_step = cProfile.Profile(), cProfile.Profile()
            step_of = lm.step

            # A profile per thread up to Python 3.11; from 3.12 (sys.monitoring) one profile sees every
            # thread and a second one cannot start: then the first covers both.
            per_thread = sys.version_info < (3, 12)

            def profiled_step(batch: Any) -> list[int]:  # the model's worker thread
                if per_thread:
                    in_step.enable()
                try:
                    out: list[int] = step_of(batch)
                finally:
                    if per_thread:
                        in_step.disable()
                return out

            lm.step = profiled_step
            profiler.enable()
            scheduler_run(lm, requests, batch)
            profiler.disable()
            del lm.step
            threads = [("the event loop's thread", profiler), ("the model step's thread", in_step)]
            if not per_thread:
                threads = [("every thread (Python 3.12+)", profiler)]
            for title, which in threads:
                text = io.StringIO()
                pstats.Stats(which, stream=text).sort_stats("tottime").print_stats(16)
                print(f"{name}: cProfile of one more run, {title}, by own time\n{text.getvalue()}")
        return outcome

    def http(self, name: str) -> list[tuple[str, Outcome, list[Request]]]:
        """cK: `tandem serve` with K processes (--workers), the request set sent at once (one in
        --stream-every streamed), after one untimed pass; then, on the same server, the set repeated
        --half-repeat times in open loop at half the rate the burst reached (time to first token at half
        of saturation). cK-before: the same served from --before's copy of the package; cK-bN: each
        process batches at most N sequences (default --http-batch)."""
        args, requests = self.args, self.requests
        base, *options = name.split("-")
        workers = int(base[1:])
        interval = next((o[2:] for o in options if o.startswith("si")), None)
        batch = next((o[1:] for o in options if o.startswith("b") and o != "before"), str(args.http_batch))
        source = None
        if "before" in options:
            if args.before is None:
                raise SystemExit(f"--variants {name}: give --before DIR (a copy of the older package)")
            source = str(args.before)
        server_args = [
            "--runtime", "causal-lm", "--model-uri", str(self.checkpoint), "--model-name", "gpt",
            "--device", args.device, "--precision", args.precision, "--workers", str(workers),
            "--max-batch-size", batch, "--max-queue-delay-ms", "1",
            "--max-queue-size", "1000000", "--max-queue-wait-ms", "0", "--request-timeout-s", "600",
            "--max-connections", "1000000",
            "--log-level", "warning",
        ]  # fmt: skip
        repeated = requests * args.half_repeat
        env: dict[str, str] = {}
        if args.fake_step_ms is not None:
            env[STEP_MS_ENV] = str(args.fake_step_ms)
        if interval is not None:
            env[SWITCH_MS_ENV] = interval
        launcher = [sys.executable, str(Path(__file__).resolve().parent / "serve_variant.py")]
        with ServerProcess(
            server_args, startup_timeout_s=1200, source=source, command=launcher if env else None, env=env
        ) as server:
            pids = [server.pid, *server.worker_pids]

            async def session() -> list[tuple[str, Outcome, list[Request]]]:
                client = HttpClient(server.url)
                try:
                    await http_run(client, requests, args.stream_every)  # warm-up, opens the connections
                    cpu, steps = cpu_seconds(pids), steps_taken(server)
                    burst = await http_run(client, requests, args.stream_every)
                    burst.notes["server_cpu_s"] = round(cpu_seconds(pids) - cpu, 2)
                    burst.notes["processes"] = workers
                    if workers == 1:  # (with several, /metrics is one worker's, whichever answers)
                        burst.notes["steps"] = int(steps_taken(server) - steps)
                        burst.notes["ms_a_step"] = round(1000 * burst.seconds / burst.notes["steps"], 2)
                    rate = len(requests) / burst.seconds / 2
                    half = await http_run(client, repeated, args.stream_every, rate=rate)
                    half.notes["offered_req_per_s"] = round(rate, 1)
                    return [(name, burst, requests), (f"{name} at half", half, repeated)]
                finally:
                    client.close()

            return asyncio.run(session())


def table(rows: list[dict[str, Any]]) -> None:
    print("\n| variant | useful tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | notes |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        if "failed" in row:
            print(f"| {row['variant']} | FAILED | | | {row['failed']} |")
            continue
        if "f_tokens_per_s" in row:
            f0 = ""
            if "f0_step_ms" in row:
                f0 = (
                    f", f0 (replay alone) {row['f0_tokens_per_s']:,.0f} tok/s, {row['f0_step_ms']:.3f} ms a "
                    f"step at width {row['f0_width']}"
                )
            print(
                f"| {row['variant']} | {row['f_tokens_per_s']:,.0f} | | | {row['f_step_ms']:.3f} ms a step, "
                f"{row['graphs']} graphs{f0} |\n| fm (the request set through the cache alone) | "
                f"{row['fm_tokens_per_s']:,.0f} | | | |"
            )
            continue
        skip = {"variant", "tokens_per_s", "seconds"}
        extra = ", ".join(
            f"{k} {v}" for k, v in row.items() if k not in skip and not k.startswith(("ttft", "itl"))
        )
        print(
            f"| {row['variant']} | {row['tokens_per_s']:,.0f} | {row['ttft_p50_ms']:.0f} / "
            f"{row['ttft_p99_ms']:.0f} | {row['itl_p50_ms']:.1f} / {row['itl_p99_ms']:.1f} | {extra} |"
        )


def main() -> None:
    args = parse_args()
    variants = args.variants.split(",")
    bench = Bench(args)
    print(bench.header(), flush=True)
    rows: list[dict[str, Any]] = []
    outcomes: dict[str, Outcome] = {}
    largest = max([int(v[1:]) for v in variants if v[0] in "snemo" and v[1:].isdigit()], default=32)
    if args.http_batch is None:
        args.http_batch = max([int(v[1:]) for v in variants if v[0] in "sm" and v[1:].isdigit()], default=256)
    for name in variants:
        if name == "g":
            print(f"g: {graph_check(bench.lm, args.device)}", flush=True)
            continue
        if name == "f":
            result = floor(bench.lm, bench.requests, largest, args.max_answer, args.vocab, args.device)
            print(f"f: {result}", flush=True)
            rows.append({"variant": f"f (static batch {largest})", **result})
            continue
        subset = bench.requests
        if name.startswith("hf"):
            if args.fake_step_ms is not None:
                raise SystemExit(f"--variants {name}: HF's generate has no fake step (--fake-step-ms)")
            done = bench.huggingface(name)
            if done is None:
                continue
            outcome, subset = done
        elif name[0] in "snemo" and name[1:].isdigit():
            outcome = bench.tandem(name)
        elif HTTP_VARIANT.fullmatch(name):
            reference = next((o for o in outcomes.values() if len(o.tokens) == len(bench.requests)), None)
            try:  # a server that fails (start-up, a wrong answer) must not cost the other variants' results
                for label, outcome, subset in bench.http(name):
                    outcomes[label] = outcome
                    rows.append(summarize(label, outcome, subset, reference))
                    print(rows[-1], flush=True)
            except (Exception, SystemExit) as exc:
                print(f"{name}: FAILED: {exc}", flush=True)
                rows.append({"variant": name, "failed": str(exc).splitlines()[0][:200]})
            continue
        else:
            raise SystemExit(f"--variants: unknown variant {name!r}")
        reference = next((o for o in outcomes.values() if len(o.tokens) == len(bench.requests)), None)
        outcomes[name] = outcome
        rows.append(summarize(name, outcome, subset, reference))
        print(rows[-1], flush=True)
    table(rows)
    ratios(rows)


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each HTTP burst against the in-process runs (the goal: one process >= 85% of the scheduler in
    process with the same streamed share, mN)."""
    rates = {row["variant"]: row["tokens_per_s"] for row in rows if "tokens_per_s" in row}
    inside = [v for v in rates if v[0] in "ms" and v[1:].isdigit()]
    for http in [v for v in rates if v[0] == "c" and "half" not in v]:
        for base in inside:
            print(f"{http} / {base}: {rates[http] / rates[base]:.0%}")


if __name__ == "__main__":
    main()
