"""The continuous-batching generation scheduler in pure asyncio, with a pure-Python "model".

`CountingModel` continues every sequence with the next letter after its last token; its `gate` (if set)
blocks each step in the worker thread until the test releases it, so the tests control exactly what is
queued or active between steps. No sleeps stand in for conditions.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.detokenize import text_decoder
from tandem.workloads.serve.errors import Draining, ModelError, QueueFull
from tandem.workloads.serve.generation import (
    GenerationScheduler,
    GenSequence,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    collect,
    prompt_ids,
    safe_prefix,
    stop_position,
)
from tandem.workloads.serve.metrics import ServeMetrics

T = TypeVar("T")
EOS = 0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class CountingModel:
    """Token ids are character codes; the next token is the next character ('z' is followed by EOS)."""

    name = "counting"
    eos_id: int | None = EOS
    vocab_size = 0x110000  # every code point

    def __init__(self, *, gated: bool = False, fail: bool = False) -> None:
        self.steps: list[int] = []  # batch size of every step
        self.gate = threading.Semaphore(0) if gated else None
        self.fail = fail
        self.stepping = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def step(self, batch: list[GenSequence]) -> list[int]:
        self.steps.append(len(batch))
        self.loop.call_soon_threadsafe(self.stepping.set)
        if self.gate is not None:
            self.gate.acquire()
        if self.fail:
            raise RuntimeError("boom")
        return [EOS if s.ids[-1] == ord("z") else s.ids[-1] + 1 for s in batch]


def scheduler(model: CountingModel, **batching: Any) -> GenerationScheduler:
    config = BatchingConfig(**{"max_batch_size": 4, "max_queue_delay_ms": 0, **batching})
    metrics = ServeMetrics(model.name, config.max_batch_size, process_metrics=False)
    sched = GenerationScheduler(model, config, metrics)
    sched.start()
    return sched


async def text_of(sched: GenerationScheduler, prompt: str, **params: Any) -> TokenEvent:
    handle = sched.submit([sched.model.encode(prompt)], SamplingParams(**params), stream=False)
    return (await collect(handle, 1, 10))[0]


def test_generates_until_max_tokens_or_eos() -> None:
    async def main() -> None:
        sched = scheduler(CountingModel())
        assert await text_of(sched, "a", max_tokens=3) == TokenEvent(0, "bcd", "length", 3)
        assert await text_of(sched, "x", max_tokens=10) == TokenEvent(0, "yz", "stop", 2)
        await sched.close()

    run(main())


def test_stop_strings_cut_the_text_and_are_never_streamed() -> None:
    async def main() -> None:
        sched = scheduler(CountingModel())
        event = await text_of(sched, "a", max_tokens=20, stop=("def",))
        assert event == TokenEvent(0, "bc", "stop", 5)
        handle = sched.submit(
            [sched.model.encode("a")], SamplingParams(max_tokens=20, stop=("def",)), stream=True
        )
        streamed = []
        while (e := await handle.next_event()) is not None:
            streamed.append(e.text)
        assert "".join(streamed) == "bc"
        assert all("d" not in piece for piece in streamed)
        await sched.close()

    run(main())


def test_safe_prefix_holds_back_partial_characters_and_stop_prefixes() -> None:
    assert safe_prefix("hello wo", ("world",)) == len("hello ")
    assert safe_prefix("hello", ()) == 5
    assert safe_prefix("ab\ufffd", ()) == 2
    assert stop_position("one. two.", (".", "two")) == 3
    assert stop_position("abc", ("x",)) == -1


def test_requests_join_the_running_batch_between_steps() -> None:
    async def main() -> None:
        model = CountingModel(gated=True)
        sched = scheduler(model)
        assert model.gate is not None
        first = asyncio.ensure_future(text_of(sched, "a", max_tokens=3))
        await model.stepping.wait()  # step 1 runs with one sequence
        model.stepping.clear()
        second = asyncio.ensure_future(text_of(sched, "k", max_tokens=2))
        while sched.queue_depth != 1:
            await asyncio.sleep(0)
        model.gate.release()
        await model.stepping.wait()  # step 2: the second request joined
        for _ in range(4):
            model.gate.release()
        assert (await first).text == "bcd"
        assert (await second).text == "lm"
        assert model.steps[:2] == [1, 2]
        await sched.close()

    run(main())


def test_a_cancelled_request_leaves_before_its_next_step() -> None:
    async def main() -> None:
        model = CountingModel(gated=True)
        sched = scheduler(model)
        assert model.gate is not None
        handle = sched.submit([model.encode("a")], SamplingParams(max_tokens=1000), stream=True)
        await model.stepping.wait()
        handle.cancel()
        model.gate.release()
        other = asyncio.ensure_future(text_of(sched, "q", max_tokens=1))
        model.gate.release()
        assert (await other).text == "r"
        assert sched.active == 0
        assert model.steps == [1, 1]  # the cancelled sequence was not in the second step
        await sched.close()

    run(main())


def test_a_model_error_reaches_every_request_of_the_step() -> None:
    async def main() -> None:
        sched = scheduler(CountingModel(fail=True), max_queue_delay_ms=60_000, max_batch_size=2)
        results = await asyncio.gather(
            text_of(sched, "a", max_tokens=2), text_of(sched, "b", max_tokens=2), return_exceptions=True
        )
        assert all(isinstance(r, ModelError) and "boom" in str(r) for r in results)
        await sched.close()

    run(main())


def test_a_full_queue_is_refused_with_retry_after() -> None:
    async def main() -> None:
        model = CountingModel(gated=True)
        sched = scheduler(model, max_batch_size=1, max_queue_size=2)
        assert model.gate is not None
        sched.submit([[97]], SamplingParams(max_tokens=1), stream=False)
        await model.stepping.wait()  # one active, none waiting
        sched.submit([[97], [98]], SamplingParams(max_tokens=1), stream=False)  # two waiting
        with pytest.raises(QueueFull) as refused:
            sched.submit([[99]], SamplingParams(max_tokens=1), stream=False)
        assert refused.value.retry_after_s >= 1
        for _ in range(3):
            model.gate.release()
        await sched.close(drain=True)

    run(main())


def test_drain_finishes_active_sequences_and_refuses_new_ones() -> None:
    async def main() -> None:
        model = CountingModel(gated=True)
        sched = scheduler(model)
        assert model.gate is not None
        running = asyncio.ensure_future(text_of(sched, "a", max_tokens=2))
        await model.stepping.wait()
        closing = asyncio.ensure_future(sched.close(drain=True))
        while not sched._closing:
            await asyncio.sleep(0)
        with pytest.raises(Draining):
            sched.submit([[97]], SamplingParams(), stream=False)
        model.gate.release()
        model.gate.release()
        assert (await running).text == "bc"
        await closing

    run(main())


class PoisonModel(CountingModel):
    """A CountingModel whose step fails whenever a sequence that began with `poison` is in the batch."""

    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = ord(poison)

    def step(self, batch: list[GenSequence]) -> list[int]:
        if any(s.ids[0] == self.poison for s in batch):
            self.steps.append(len(batch))
            raise RuntimeError("poisoned row")
        return super().step(batch)


def test_a_failing_sequence_fails_alone_and_its_step_carries_on() -> None:
    async def main() -> None:
        model = PoisonModel("!")
        sched = scheduler(model, max_queue_delay_ms=60_000, max_batch_size=3)
        results = await asyncio.gather(
            text_of(sched, "a", max_tokens=3),
            text_of(sched, "!", max_tokens=3),
            text_of(sched, "k", max_tokens=3),
            return_exceptions=True,
        )
        assert results[0] == TokenEvent(0, "bcd", "length", 3)
        assert results[2] == TokenEvent(0, "lmn", "length", 3)
        assert isinstance(results[1], ModelError)
        assert "poisoned row" in str(results[1])
        assert model.steps[0] == 3, "the three did not share the first step"
        await sched.close()
        # a request with a failing prompt fails whole: its other sequence stops too
        sched = scheduler(PoisonModel("!"))
        handle = sched.submit(
            [sched.model.encode("!"), sched.model.encode("a")], SamplingParams(max_tokens=5), stream=False
        )
        with pytest.raises(ModelError):
            await collect(handle, 2, 10)
        assert (await text_of(sched, "p", max_tokens=2)).text == "qr"
        assert sched.active == 0
        await sched.close()

    run(main())


class LogprobModel(CountingModel):
    """Reports, like a runtime does, a log-probability for each token it chooses when asked."""

    def step(self, batch: list[GenSequence]) -> list[int]:
        tokens = super().step(batch)
        for seq, token in zip(batch, tokens, strict=True):
            if seq.params.logprobs is not None:
                seq.logprob = TokenLogprob(token, -float(token), ((token, -float(token)),))
        return tokens


def test_log_probabilities_travel_with_their_tokens() -> None:
    async def main() -> None:
        sched = scheduler(LogprobModel())
        event = await text_of(sched, "a", max_tokens=3, logprobs=1)
        assert [e.token for e in event.logprobs] == [ord(c) for c in "bcd"]
        assert [e.logprob for e in event.logprobs] == [-float(ord(c)) for c in "bcd"]
        handle = sched.submit(
            [sched.model.encode("a")], SamplingParams(max_tokens=6, stop=("ef",), logprobs=0), stream=True
        )
        streamed: list[TokenLogprob] = []
        while (e := await handle.next_event()) is not None:
            streamed.extend(e.logprobs)
            assert len(streamed) == e.completion_tokens  # each event carries its own tokens' entries
        assert [e.token for e in streamed] == [ord(c) for c in "bcdef"]
        assert (await text_of(sched, "a", max_tokens=2)).logprobs == ()  # not asked: none
        await sched.close()

    run(main())


class WindowModel(CountingModel):
    block_size = 4
    prompt_chars = 4

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return super().encode(text)


def test_prompts_are_cut_to_the_window_before_tokenizing() -> None:
    async def main() -> None:
        model = WindowModel()
        assert prompt_ids(model, "x" * 1_000_000 + "abcd") == [ord(c) for c in "abcd"]
        assert model.encoded == ["abcd"]  # the tokenizer never saw the megabyte
        assert prompt_ids(model, "ab") == [ord("a"), ord("b")]

    run(main())


def test_logit_processors_bias_and_penalize_generated_tokens_only() -> None:
    import torch

    from tandem.workloads.serve.sampling import adjust_logits, record_logprobs

    penalized = GenSequence(
        [1, 5, 5, 5, 7],  # prompt [1, 5], generated [5, 5, 7]
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((2, 3.0),)),
        generated=3,
    )
    plain = GenSequence([1, 5], SamplingParams(logprobs=2))
    logits = torch.zeros(2, 8)
    adjust_logits([penalized, plain], logits)
    assert logits[0].tolist() == [0.0, 0.0, 3.0, 0.0, 0.0, -(0.5 + 2 * 0.25), 0.0, -(0.5 + 0.25)]
    assert logits[1].tolist() == [0.0] * 8

    logits[1] = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    record_logprobs([penalized, plain], logits, [2, 2])
    assert penalized.logprob is None  # it did not ask
    expected = torch.log_softmax(logits[1], dim=-1)
    assert plain.logprob is not None
    assert plain.logprob.token == 2
    assert plain.logprob.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in plain.logprob.top] == [1, 2]
    assert plain.logprob.top[0][1] == pytest.approx(float(expected[1]))


# -- incremental text: only the new token is decoded, and the pieces add up to the whole decode ------------

ANSWER = "naïve café: 1€, 𝄞 and 😀 end"  # 2-, 3- and 4-byte characters


class ScriptModel:
    """Continues every prompt with the tokens of `script` (then EOS). `pieces` are the tokens' bytes; with
    `byte_level` it says so (`token_bytes`), else the scheduler only has `decode`."""

    name = "script"

    def __init__(self, pieces: list[bytes], script: list[int], *, byte_level: bool) -> None:
        self.pieces, self.script = pieces, script
        self.eos_id: int | None = len(pieces)
        self.vocab_size = len(pieces)
        if byte_level:
            self.token_bytes = lambda token: self.pieces[token] if token < len(self.pieces) else b""

    def encode(self, text: str) -> list[int]:
        return [0]

    def decode(self, ids: Sequence[int]) -> str:
        data = b"".join(self.pieces[i] for i in ids if i < len(self.pieces))
        return data.decode("utf-8", errors="replace")

    def step(self, batch: list[GenSequence]) -> list[int]:
        return [
            self.script[s.generated] if s.generated < len(self.script) else len(self.pieces) for s in batch
        ]


def byte_model(data: bytes) -> ScriptModel:
    return ScriptModel([bytes([b]) for b in range(256)], list(data), byte_level=True)


def merged_model(data: bytes, rng: random.Random) -> ScriptModel:
    """A subword vocabulary: `data` cut into random chunks of 1-5 bytes (often inside a character), each a
    token."""
    pieces: list[bytes] = []
    at = 0
    while at < len(data):
        size = rng.randint(1, 5)
        pieces.append(data[at : at + size])
        at += size
    return ScriptModel(pieces, list(range(len(pieces))), byte_level=False)


async def streamed_pieces(model: ScriptModel, **params: Any) -> tuple[list[str], TokenEvent]:
    sched = GenerationScheduler(
        model,
        BatchingConfig(max_batch_size=4, max_queue_delay_ms=0),
        ServeMetrics(model.name, 4, process_metrics=False),
    )
    sched.start()
    handle = sched.submit([[0]], SamplingParams(max_tokens=1000, **params), stream=True)
    pieces = []
    while (event := await handle.next_event()) is not None:
        pieces.append(event.text)
        last = event
    whole = (
        await collect(sched.submit([[0]], SamplingParams(max_tokens=1000, **params), stream=False), 1, 10)
    )[0]
    await sched.close()
    return pieces, whole if last.finish_reason else last


@pytest.mark.parametrize("byte_level", [True, False])
def test_streamed_text_equals_the_whole_decode_with_characters_split_across_tokens(byte_level: bool) -> None:
    async def main() -> None:
        data = ANSWER.encode()
        model = byte_model(data) if byte_level else merged_model(data, random.Random(3))
        pieces, whole = await streamed_pieces(model)
        assert "".join(pieces) == ANSWER == whole.text
        assert whole.finish_reason == "stop"
        assert all("\ufffd" not in p for p in pieces)  # never half a character, even for a moment
        # Streamed as it came, not at the end: byte-wise, each character in the step its last byte came.
        sent = [p for p in pieces if p]
        assert len(sent) == len(ANSWER) if byte_level else len(sent) > len(model.script) // 3

    run(main())


@pytest.mark.parametrize("byte_level", [True, False])
def test_invalid_and_truncated_utf8_decodes_as_the_whole_answer_would(byte_level: bool) -> None:
    async def main() -> None:
        # A stray continuation byte, an overlong lead, a character cut short mid-text, and one at the end.
        data = b"ok \x80 then \xc0\xaf, cut \xe2\x82 here, end \xf0\x9f\x98"
        model = byte_model(data) if byte_level else merged_model(data, random.Random(5))
        pieces, whole = await streamed_pieces(model)
        expected = data.decode("utf-8", errors="replace")
        assert "".join(pieces) == expected == whole.text

    run(main())


def test_stop_strings_are_found_across_token_and_character_boundaries() -> None:
    async def main() -> None:
        pieces, whole = await streamed_pieces(byte_model(ANSWER.encode()), stop=("😀 e", "zz"))
        assert "".join(pieces) == ANSWER[: ANSWER.index("😀 e")] == whole.text
        assert whole.finish_reason == "stop"

    run(main())


def test_incremental_decoders_match_whole_decodes_of_random_bytes() -> None:
    rng = random.Random(0)
    alphabet = [*"aé€𝄞 ".encode(), 0x80, 0xBF, 0xC0, 0xE2, 0xF0, 0xFF]
    for case in range(200):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        model = byte_model(data) if case % 2 else merged_model(data, rng)
        ids: list[int] = []
        decoder = text_decoder(model, ids, 0)
        text = ""
        for token in model.script:
            ids.append(token)
            text += decoder.push(token)
        text += decoder.finish()
        assert text == data.decode("utf-8", errors="replace"), (case, data)


def test_the_inter_token_histogram_counts_every_gap_between_two_tokens_of_a_sequence() -> None:
    async def main() -> None:
        sched = scheduler(CountingModel(), max_batch_size=8)
        answers = [3, 7, 1, 12]
        handles = [
            sched.submit([sched.model.encode("a")], SamplingParams(max_tokens=n), stream=False)
            for n in answers
        ]
        await asyncio.gather(*(collect(h, 1, 10) for h in handles))
        metrics = sched._observer
        assert isinstance(metrics, ServeMetrics)
        histogram = next(iter(metrics.inter_token_latency.collect())).samples
        count = next(s.value for s in histogram if s.name.endswith("_count"))
        infinite = next(s.value for s in histogram if s.labels.get("le") == "+Inf")
        assert count == infinite == sum(n - 1 for n in answers)
        await sched.close()

    run(main())


def test_time_to_first_token_is_observed_once_per_request_streamed_or_not() -> None:
    async def main() -> None:
        sched = scheduler(CountingModel(), max_batch_size=8)
        handles = [
            sched.submit([sched.model.encode("a")], SamplingParams(max_tokens=4), stream=stream)
            for stream in (False, True, False)
        ]
        await asyncio.gather(*(collect(h, 1, 10) for h in handles))
        metrics = sched._observer
        assert isinstance(metrics, ServeMetrics)
        histogram = next(iter(metrics.time_to_first_token.collect())).samples
        assert next(s.value for s in histogram if s.name.endswith("_count")) == 3
        await sched.close()

    run(main())


class CachingModel(CountingModel):
    """Reports a KV cache that holds every sequence of its last step in 8 slots of 1 KiB."""

    held = 0

    def step(self, batch: list[GenSequence]) -> list[int]:
        self.held = len(batch)
        return super().step(batch)

    def cache_usage(self) -> tuple[int, int, int]:
        return self.held, 8, 8 * 1024


def test_the_kv_cache_gauges_follow_the_model_after_each_step() -> None:
    async def main() -> None:
        model = CachingModel()
        sched = scheduler(model, max_batch_size=8)
        handles = [
            sched.submit([model.encode("x")], SamplingParams(max_tokens=2), stream=False) for _ in range(3)
        ]
        await asyncio.gather(*(collect(h, 1, 10) for h in handles))
        metrics = sched._observer
        assert isinstance(metrics, ServeMetrics)
        text = metrics.render().decode()
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tandem_serve_kv_cache")
        }
        assert values["tandem_serve_kv_cache_capacity_sequences"] == 8
        assert values["tandem_serve_kv_cache_bytes"] == 8 * 1024
        assert values["tandem_serve_kv_cache_sequences"] == model.held > 0
        await sched.close()

    run(main())


def test_a_stream_that_falls_behind_gets_what_queued_up_in_one_event() -> None:
    async def main() -> None:
        model = CountingModel(gated=True)
        sched = scheduler(model)
        assert model.gate is not None
        handle = sched.submit([model.encode("a")], SamplingParams(max_tokens=5), stream=True)
        for _ in range(3):  # three steps run while nobody reads the stream
            await model.stepping.wait()
            model.stepping.clear()
            model.gate.release()
        await model.stepping.wait()  # the fourth step started: the first three tokens are queued
        first = await handle.next_event()
        assert first == TokenEvent(0, "bcd", None, 3)
        model.gate.release(2)  # the last two steps
        rest = []
        while (event := await handle.next_event()) is not None:
            rest.append(event)
        assert "".join(e.text for e in rest) == "ef"
        assert rest[-1].finish_reason == "length"
        assert rest[-1].completion_tokens == 5
        await sched.close()

    run(main())
