"""Continuous batching for text generation (the `causal-lm` runtime), in pure asyncio.

The scheduler keeps a set of *active* sequences and runs one decoding step for all of them at a time (one
forward pass, in a worker thread, off the event loop). Between two steps, finished and abandoned sequences
leave and waiting ones join (iteration-level scheduling, as in Orca / vLLM), so a new request never waits
for a long generation to end, only for the current step. When nothing is generating, the first request waits
up to `max_queue_delay_ms` for company (like the dynamic batcher), then generation starts.

Guarantees: every request ends (its tokens, its own error, `Draining`, or a timeout handled by the
caller); a step that fails is retried in halves until the failing sequences are found, so one bad sequence
fails only its own request and the rest of the step carries on; a request whose client went away
(`GenerationHandle.cancel`) is dropped before its next step; the number of waiting sequences is bounded
(`QueueFull` with Retry-After); `predict`-style length checks on every step. Text is produced here, one
token at a time (`detokenize`: only the new token is decoded), with stop strings and held-back partial
characters, so the protocol layer only formats; a request that is not streamed gets one event per
sequence, at its end.
Start, drain, shutdown and admission are the dynamic batcher's (`queueloop.QueueLoop`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem.workloads.serve.batcher import BatchingConfig, BatchObserver
from tandem.workloads.serve.detokenize import TextDecoder, text_decoder
from tandem.workloads.serve.errors import ModelError, RequestTimeout, ServeError
from tandem.workloads.serve.queueloop import QueueLoop


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    """0 is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to `top_p`."""
    seed: int | None = None
    """Seeds this sequence's own random generator (so a seeded answer does not depend on its batch)."""
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before choosing (OpenAI's `logit_bias`): -100 bans a
    token, +100 all but forces it."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's, -2 to 2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI's, -2 to 2)."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives (None: off)."""

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits is the answer: no sampling, bias, penalties or log-probabilities
        (a runtime may then choose on the device without reading the logits back)."""
        return (
            self.temperature <= 0
            and not self.logit_bias
            and not self.presence_penalty
            and not self.frequency_penalty
            and self.logprobs is None
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (after `logit_bias` and penalties, before temperature and
    top_p) and the `top` most likely tokens at that step, as (token id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def prompt_ids(model: GenerativeModel, text: str) -> list[int]:
    """The prompt's tokens the model can read: at most its window (`block_size`), the newest ones.

    The text is cut *before* tokenizing when the model says how many trailing characters can reach its
    window (`prompt_chars`; a byte-level model: one token per byte, at least one per character), so an
    8 MB prompt costs what a window-sized one does."""
    chars = getattr(model, "prompt_chars", 0)
    if chars and len(text) > chars:
        text = text[-chars:]
    ids = model.encode(text)
    window = getattr(model, "block_size", 0)
    return ids[-window:] if window else ids


@dataclass(eq=False)
class GenSequence:
    """One prompt being continued. The model reads `ids` (prompt + generated) and `params`, and may keep its
    own per-sequence `state` (e.g. a random generator); the scheduler appends the tokens."""

    ids: list[int]
    params: SamplingParams
    index: int = 0
    prompt_tokens: int = 0
    state: Any = None
    generated: int = 0
    text: str = ""
    sent: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None
    enqueued: float = 0.0
    request: _Request | None = None
    logprob: TokenLogprob | None = None
    """Set by the model's step when `params.logprobs` asks for it: the chosen token's log-probability."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Log-probabilities of generated tokens not yet handed out in an event."""
    last_token_at: float | None = None
    """When its previous token came (perf_counter), for the inter-token latency."""
    decoder: TextDecoder | None = None
    """Turns its generated tokens into text one token at a time (made at its first token)."""
    pending: int | None = None
    """Its newest token, appended to `ids` but not yet turned into text (the scheduler's two phases)."""


class GenerativeModel(Protocol):
    """What the scheduler needs from a language model (`runtimes.causal_lm.CausalLM`)."""

    name: str
    eos_id: int | None
    vocab_size: int
    """Token ids the model can produce: 0 to vocab_size - 1."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. A model may also offer `token_bytes(token) -> bytes` (the bytes one token stands
        for): the scheduler then decodes each sequence's text byte-wise (`detokenize.ByteDecoder`)."""

    def step(self, batch: list[GenSequence]) -> list[int]:
        """One decoding step: the next token of every sequence, in order (runs in a worker thread)."""


class GenerationObserver(BatchObserver, Protocol):
    def tokens(self, count: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None:
        """One inter-token latency. An observer may also offer `inter_tokens(seconds, count)` (`count`
        equal latencies at once): the sequences of a step share one interval, so the scheduler then makes
        one call per step rather than one per token."""


@dataclass(slots=True)
class TokenEvent:
    """New text of one sequence of a request (`text` may be empty on the last event). Not frozen: one is
    made per streamed token, and a frozen dataclass takes 3x as long to make."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens' log-probabilities since the previous event (when the request asked for them)."""


class _Events:
    """A request's events, in order, with at most one reader. `asyncio.Queue`'s generality (sizes, many
    getters and putters) cost ~3 us an event, and a streamed request gets one per token."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TokenEvent | ServeError] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: TokenEvent | ServeError) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> TokenEvent | ServeError:
        """The next item; a streamed sequence's events that queued up while the reader was busy come as
        one (its texts and log-probabilities joined), so a slow reader catches up in one write."""
        items = self._items
        while not items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        while (
            isinstance(item, TokenEvent)
            and item.finish_reason is None
            and items
            and isinstance(following := items[0], TokenEvent)
            and following.index == item.index
        ):
            items.popleft()
            item = TokenEvent(
                item.index,
                item.text + following.text,
                following.finish_reason,
                following.completion_tokens,
                item.logprobs + following.logprobs,
            )
        return item


@dataclass(eq=False)
class _Request:
    sequences: list[GenSequence]
    stream: bool
    submitted: float
    events: _Events = field(default_factory=_Events)
    cancelled: bool = False
    unfinished: int = 0
    first_token_seen: bool = False


class GenerationHandle:
    """The caller's side of one request: its events, in order, until every sequence has finished."""

    def __init__(self, scheduler: GenerationScheduler, request: _Request) -> None:
        self._scheduler = scheduler
        self._request = request
        self._open = request.unfinished

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self._request.sequences)

    async def next_event(self) -> TokenEvent | None:
        """The next event, None after the last one; raises the request's error (`ServeError`)."""
        if self._open == 0:
            return None
        item = await self._request.events.get()
        if isinstance(item, ServeError):
            self._open = 0
            raise item
        if item.finish_reason is not None:
            self._open -= 1
        return item

    def cancel(self) -> None:
        """The caller is gone: drop its sequences before their next step (harmless once finished)."""
        self._scheduler._cancel(self._request)


def stop_position(text: str, stops: Sequence[str], new: int = 0) -> int:
    """Where the earliest stop string starts in `text`, or -1; `new`: where the text not yet searched
    starts (a stop found earlier would have ended the sequence, so only stops reaching past it count)."""
    found = [i for i in (text.find(s, max(0, new - len(s) + 1)) for s in stops if s) if i >= 0]
    return min(found, default=-1)


def safe_prefix(text: str, stops: Sequence[str]) -> int:
    """How much of an unfinished sequence's `text` can be sent: not a trailing partial UTF-8 character
    (U+FFFD from an incomplete byte sequence), not a tail that may be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd" and len(text) - end < 3:
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text[end - k : end] == stop[:k]:
                hold = k
                break
    return end - hold


@dataclass
class _Running:
    """A step handed to the worker thread."""

    batch: list[GenSequence]
    future: asyncio.Future[list[int]]
    started: float


class GenerationScheduler(QueueLoop[GenSequence]):
    """Continuous batching of generation requests. Use inside one running event loop."""

    def __init__(self, model: GenerativeModel, config: BatchingConfig, observer: GenerationObserver) -> None:
        super().__init__(config, name="generation scheduler", threads=1)
        self.model = model
        self._observer = observer
        self._active: list[GenSequence] = []
        self._step_seconds = 0.0
        self._running: _Running | None = None
        many = getattr(observer, "inter_tokens", None)
        self._inter_tokens: Callable[[float, int], None] = many or self._inter_token_each
        # A model with a KV cache may offer `cache_usage() -> (held, slots, bytes)`; an observer with
        # `kv_cache(held, slots, bytes)` records it after each step (the dashboards' KV cache panel).
        usage, record = getattr(model, "cache_usage", None), getattr(observer, "kv_cache", None)
        self._cache_usage: Callable[[], None] | None = (
            (lambda: record(*usage())) if usage is not None and record is not None else None
        )

    @property
    def active(self) -> int:
        return len(self._active)

    def _busy(self) -> bool:
        return bool(self._queue or self._active or self._running)

    # -- submitting ---------------------------------------------------------------------------------

    def submit(
        self, prompts: Sequence[list[int]], params: SamplingParams, *, stream: bool
    ) -> GenerationHandle:
        """Queue one request (one sequence per prompt, all or none) and return its handle."""
        self._admit_check(len(prompts), "prompt", "prompts")
        now = asyncio.get_running_loop().time()
        request = _Request([], stream, time.perf_counter())
        for index, ids in enumerate(prompts):
            seq = GenSequence(list(ids), params, index, len(ids), enqueued=now, request=request)
            request.sequences.append(seq)
        request.unfinished = len(request.sequences)
        self._queue.extend(request.sequences)
        self._observer.queue_depth(len(self._queue))
        self._arrived.set()
        return GenerationHandle(self, request)

    def retry_after_s(self) -> int:
        steps_ahead = len(self._queue) / self.config.max_batch_size + 1
        return max(1, math.ceil(steps_ahead * self._step_seconds * 16))

    def _cancel(self, request: _Request) -> None:
        if request.cancelled or request.unfinished == 0:
            return
        request.cancelled = True
        removed = False
        for seq in request.sequences:
            if seq.finish_reason is None and seq in self._queue:
                self._queue.remove(seq)
                seq.finish_reason = "cancelled"
                self._observer.dropped("cancelled")
                removed = True
        if removed:
            self._observer.queue_depth(len(self._queue))
            self._progress.set()

    def _fail_everything(self, error: ServeError) -> None:
        for seq in [*self._active, *self._queue]:
            self._fail(seq, error)
        self._active.clear()
        self._queue.clear()
        self._observer.queue_depth(0)
        self._progress.set()

    def _fail(self, seq: GenSequence, error: ServeError) -> None:
        """End `seq`'s request with `error`: its other sequences stop too (they leave at the step's end)."""
        request = seq.request
        if seq.finish_reason is None:
            seq.finish_reason = "error"
        if request is None:
            return
        removed = False
        for other in request.sequences:
            if other.finish_reason is None:
                other.finish_reason = "error"
                if other in self._queue:
                    self._queue.remove(other)
                    removed = True
        if removed:
            self._observer.queue_depth(len(self._queue))
        if request.unfinished:
            request.unfinished = 0
            request.events.put_nowait(error)

    # -- the scheduling loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Steps, pipelined: as soon as a step's tokens are in, each row's token is appended and its end by
        length or EOS decided (`_apply`), waiting sequences join, and the next step is handed to the worker
        thread; only then is the step's text made and handed out (`_publish`: decoding, stop strings,
        events, metrics), while the model computes the next step. A sequence that a stop string or its
        client ends in `_publish` is in the next step already: its token from that step is dropped."""
        running: _Running | None = None
        try:
            while True:
                if running is None:
                    await self._admit()  # waits while nothing is active
                    running = self._running = self._launch()
                    if running is None:
                        self._progress.set()
                        continue
                tokens = await self._result(running.batch, running.future)
                self._observe_step(running, tokens)
                applied = self._apply(running.batch, tokens)
                self._active = [s for s in self._active if s.finish_reason is None]
                self._take_queued()
                running = self._running = self._launch()
                self._publish(applied)
                self._active = [s for s in self._active if s.finish_reason is None]
                self._progress.set()
        finally:
            self._running = None
            if running is not None:
                running.future.cancel()

    async def _admit(self) -> None:
        if not self._active:
            await self._wait_for_work()
            await self._wait_for_company(self.config.max_batch_size)
        self._take_queued()

    def _take_queued(self) -> None:
        """Waiting sequences join the active ones, up to `max_batch_size`."""
        now = asyncio.get_running_loop().time()
        waits = []
        while self._queue and len(self._active) < self.config.max_batch_size:
            seq = self._queue.popleft()
            self._active.append(seq)
            waits.append(now - seq.enqueued)
        if waits:
            self._observer.queue_depth(len(self._queue))
            self._observer.batch_started(0, waits)  # queue waits only; the step observes its size

    def _launch(self) -> _Running | None:
        """Start the next step of the active sequences on the worker thread (None: nothing to step)."""
        loop = asyncio.get_running_loop()
        batch = [
            s
            for s in self._active
            if s.finish_reason is None and not (s.request is not None and s.request.cancelled)
        ]
        for seq in self._active:
            if seq.request is not None and seq.request.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                self._observer.dropped("cancelled")
        self._active = batch
        if not batch:
            return None
        self._observer.batch_started(len(batch), ())
        future = loop.run_in_executor(self._executor, self.model.step, batch)
        return _Running(batch, future, loop.time())

    def _observe_step(self, running: _Running, tokens: list[int | ServeError]) -> None:
        error = next((t for t in tokens if isinstance(t, ServeError)), None)
        seconds = asyncio.get_running_loop().time() - running.started
        self._step_seconds = seconds if not self._step_seconds else 0.8 * self._step_seconds + 0.2 * seconds
        self._observer.batch_finished(len(running.batch), seconds, error)
        if self._cache_usage is not None:
            self._cache_usage()

    def _inter_token_each(self, seconds: float, count: int) -> None:
        for _ in range(count):
            self._observer.inter_token(seconds)

    async def _tokens(self, batch: list[GenSequence]) -> list[int | ServeError]:
        loop = asyncio.get_running_loop()
        return await self._result(batch, loop.run_in_executor(self._executor, self.model.step, batch))

    async def _result(
        self, batch: list[GenSequence], future: asyncio.Future[list[int]]
    ) -> list[int | ServeError]:
        """Each sequence's next token, or the error that sequence alone fails with: a failed step is run
        again in halves (sequence state is only what `step` reads, and the KV cache recomputes any context
        it is unsure of), so the cost of a failure is a few more steps, paid only then."""
        error: ServeError
        try:
            tokens = await future
            if len(tokens) != len(batch):
                raise ModelError(f"the model returned {len(tokens)} tokens for a batch of {len(batch)}")
            return list(tokens)
        except ServeError as exc:
            error = exc
        except Exception as exc:
            error = ModelError(f"the model failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if len(batch) == 1:
            return [error]
        half = len(batch) // 2
        return [*await self._tokens(batch[:half]), *await self._tokens(batch[half:])]

    def _apply(self, batch: list[GenSequence], tokens: list[int | ServeError]) -> list[GenSequence]:
        """What the next step needs from this one's tokens: each row's token appended, its end by EOS or
        length, errors; the rows that got a token (or EOS) now, for `_publish`."""
        eos = self.model.eos_id
        applied = []
        for seq, token in zip(batch, tokens, strict=True):
            if isinstance(token, ServeError):
                self._fail(seq, token)
                continue
            if seq.finish_reason is not None:  # ended by a stop string, a failing sibling or its client
                continue
            request = seq.request
            assert request is not None
            if request.cancelled:
                seq.finish_reason = "cancelled"
                self._observer.dropped("cancelled")
                continue
            if seq.logprob is not None:  # the next step writes the next one
                seq.logprobs.append(seq.logprob)
                seq.logprob = None
            if eos is not None and token == eos:
                seq.finish_reason = "stop"
                seq.pending = None
            else:
                seq.ids.append(token)
                seq.generated += 1
                seq.pending = token
                if seq.generated >= seq.params.max_tokens:
                    seq.finish_reason = "length"
            applied.append(seq)
        return applied

    def _publish(self, applied: list[GenSequence]) -> None:
        """The text of `_apply`'s rows, stop strings, events and metrics (while the next step computes)."""
        now = time.perf_counter()  # every token of a step arrives at once
        intervals: dict[float, int] = {}  # previous token's time -> tokens (mostly one: the last step's)
        produced = 0
        for seq in applied:
            previous = seq.last_token_at
            if self._advance(seq, now):
                produced += 1
                if previous is not None:
                    intervals[previous] = intervals.get(previous, 0) + 1
        for previous, count in intervals.items():
            self._inter_tokens(now - previous, count)
        if produced:
            self._observer.tokens(produced)

    def _advance(self, seq: GenSequence, now: float) -> int:
        """Turn `seq`'s newest token (`pending`; None: it ended with EOS) into text, tell its request what is
        new; the number of tokens it produced.

        Only the new token is decoded (`detokenize`), stop strings are looked for only where the new text
        can complete one, and a request that is not streamed gets one event per sequence, when it ends."""
        request = seq.request
        assert request is not None
        params = seq.params
        decoder = seq.decoder
        if decoder is None:
            decoder = seq.decoder = text_decoder(self.model, seq.ids, seq.prompt_tokens)
        searched = len(seq.text)
        token, seq.pending = seq.pending, None
        produced = 0
        if token is not None:
            produced = 1
            seq.text += decoder.push(token)
        if seq.finish_reason is not None:
            seq.text += decoder.finish()
        if params.stop and len(seq.text) > searched:
            cut = stop_position(seq.text, params.stop, searched)
            if cut >= 0:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
        if produced:
            seq.last_token_at = now  # `_publish` observes the inter-token latencies
            if not request.first_token_seen:  # streamed or not, as vLLM counts it
                request.first_token_seen = True
                self._observer.first_token(now - request.submitted)
        if seq.finish_reason:
            request.unfinished -= 1
            self._emit(seq, len(seq.text))
        elif request.stream:
            end = safe_prefix(seq.text, params.stop)
            if end > seq.sent:
                self._emit(seq, end)
        return produced

    def _emit(self, seq: GenSequence, end: int) -> None:
        """Hand `seq`'s text up to `end` (and its log-probabilities) to its request as one event."""
        assert seq.request is not None
        new = seq.text[seq.sent : end]
        seq.sent = max(seq.sent, end)
        logprobs = tuple(seq.logprobs)
        seq.logprobs.clear()
        seq.request.events.put_nowait(TokenEvent(seq.index, new, seq.finish_reason, seq.generated, logprobs))


async def collect(handle: GenerationHandle, count: int, timeout_s: float | None) -> list[TokenEvent]:
    """Every sequence's whole text (one merged event per sequence), within `timeout_s` (504 after)."""
    texts = [""] * count
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]
    last: list[TokenEvent | None] = [None] * count
    try:
        async with asyncio.timeout(timeout_s):
            while (event := await handle.next_event()) is not None:
                texts[event.index] += event.text
                logprobs[event.index].extend(event.logprobs)
                last[event.index] = event
    except TimeoutError:
        raise RequestTimeout(
            f"no complete answer within {timeout_s:g} s (the server is overloaded or max_tokens is large; "
            "use stream: true for long generations)"
        ) from None
    return [
        TokenEvent(
            i,
            texts[i],
            e.finish_reason if e else "error",
            e.completion_tokens if e else 0,
            tuple(logprobs[i]),
        )
        for i, e in enumerate(last)
    ]
