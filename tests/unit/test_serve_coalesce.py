"""The tokenizer hand-off: requests waiting at the same time share one call in one thread, each gets its own
results (or its own error)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tandem.workloads.serve.coalesce import Coalescer


class Upper:
    """Records every call (its items and thread); refuses the text "bad"; can be held to let calls pile up."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, texts: list[str]) -> list[str]:
        self.gate.wait(30)
        self.calls.append(list(texts))
        self.threads.add(threading.current_thread().name)
        if "bad" in texts:
            raise ValueError("bad text")
        return [t.upper() for t in texts]


def test_calls_that_wait_together_share_one_call_and_get_their_own_results() -> None:
    async def main() -> None:
        fn = Upper()
        coalescer = Coalescer(fn, thread_name="tokenizer")
        answers = await asyncio.gather(coalescer(["a", "b"]), coalescer(["c"]), coalescer(["d", "e", "f"]))
        assert list(answers) == [["A", "B"], ["C"], ["D", "E", "F"]]
        assert fn.calls == [["a", "b", "c", "d", "e", "f"]]
        [thread] = fn.threads
        assert thread.startswith("tokenizer")
        assert thread != threading.current_thread().name
        coalescer.shutdown()

    asyncio.run(main())


def test_calls_in_a_later_turn_go_in_a_later_call_without_waiting_for_the_first() -> None:
    async def main() -> None:
        fn = Upper()
        coalescer = Coalescer(fn, thread_name="tokenizer")
        fn.gate.clear()
        first = asyncio.ensure_future(coalescer(["a"]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first call has been handed over (and is held in the thread)
        later = [asyncio.ensure_future(coalescer([text])) for text in ("b", "c", "d")]
        await asyncio.sleep(0)
        fn.gate.set()
        assert await first == ["A"]
        assert [await f for f in later] == [["B"], ["C"], ["D"]]
        assert fn.calls == [["a"], ["b", "c", "d"]]
        coalescer.shutdown()

    asyncio.run(main())


def test_one_callers_bad_input_fails_that_caller_only() -> None:
    async def main() -> None:
        fn = Upper()
        coalescer = Coalescer(fn, thread_name="tokenizer")
        answers = await asyncio.gather(
            coalescer(["a"]), coalescer(["bad"]), coalescer(["c"]), return_exceptions=True
        )
        assert answers[0] == ["A"]
        assert answers[2] == ["C"]
        assert isinstance(answers[1], ValueError)
        assert str(answers[1]) == "bad text"
        coalescer.shutdown()

    asyncio.run(main())


def test_a_cancelled_caller_is_left_out_and_the_rest_still_answered() -> None:
    async def main() -> None:
        fn = Upper()
        coalescer = Coalescer(fn, thread_name="tokenizer")
        gone = asyncio.ensure_future(coalescer(["gone"]))
        kept = asyncio.ensure_future(coalescer(["kept"]))
        await asyncio.sleep(0)  # both are queued; the joined call has not been made yet
        gone.cancel()
        assert await kept == ["KEPT"]
        assert fn.calls == [["kept"]]
        with pytest.raises(asyncio.CancelledError):
            await gone
        coalescer.shutdown()

    asyncio.run(main())


def test_after_shutdown_a_call_fails_instead_of_waiting_forever() -> None:
    async def main() -> None:
        coalescer = Coalescer(Upper(), thread_name="tokenizer")
        coalescer.shutdown()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(coalescer(["a"]), 30)

    asyncio.run(main())


def test_a_joined_call_takes_callers_up_to_max_items() -> None:
    async def main() -> None:
        fn = Upper()
        coalescer = Coalescer(fn, thread_name="tokenizer", max_items=3)
        answers = await asyncio.gather(*(coalescer([t, t]) for t in "abcde"))
        assert [a[0] for a in answers] == list("ABCDE")
        assert fn.calls == [list("aabb"), list("ccdd"), list("ee")]  # a caller is never split
        coalescer.shutdown()

    asyncio.run(main())
