"""The causal-lm runtime's key/value cache against the model's own forward pass (real PyTorch, CPU): every
step's logits must equal those of the whole context run from scratch, while sequences join, leave and slide
past the window."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.workloads.models.gpt import GPT, GPTConfig
from tandem.workloads.serve.runtimes.kv_cache import DecodeCache

BLOCK = 24


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=BLOCK))
    gpt.eval()
    return gpt


class Seq:
    """A sequence being generated (the cache names sequences by object, as the scheduler's are)."""

    def __init__(self, length: int, rng: random.Random) -> None:
        self.ids = [rng.randrange(64) for _ in range(length)]

    @property
    def window(self) -> list[int]:
        return self.ids[-BLOCK:]


def reference(model: GPT, context: list[int]) -> torch.Tensor:
    logits: torch.Tensor = model(torch.tensor([context]))[0]
    return logits[0, -1].float()


def step(model: GPT, cache: DecodeCache, seqs: list[Seq]) -> None:
    """One decoding step: the cache's logits must match a fresh forward pass of each whole window."""
    with torch.inference_mode():
        got = cache.logits(list(seqs), [s.window for s in seqs])
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(got[i], reference(model, seq.window), atol=1e-4, rtol=1e-4)
    for i, seq in enumerate(seqs):
        seq.ids.append(int(got[i].argmax()))


@pytest.mark.parametrize("one_pass", [False, True], ids=["split", "one-pass"])
def test_steps_match_the_whole_context_while_sequences_join_leave_and_slide(
    model: GPT, one_pass: bool
) -> None:
    rng = random.Random(1)
    cache = DecodeCache(model, one_pass=one_pass)
    seqs = [Seq(3, rng), Seq(11, rng)]
    for n in range(BLOCK + 6):  # the longer one slides past the window midway
        if n == 2:
            seqs.append(Seq(5, rng))  # joins: its whole context, in the same step as the others' one token
        if n == 6:
            seqs.pop(1)  # leaves: its slot is free again, the others' are no longer consecutive
        step(model, cache, seqs)
        fitting = sum(len(s.ids) - 1 < BLOCK for s in seqs)  # each step cached the window before the append
        assert cache.holding == fitting, f"step {n}"
    assert cache.holding == 0, "every sequence has slid past the window; none should be cached"
    assert cache.capacity == 4


def test_the_pool_grows_for_a_larger_batch_and_reuses_freed_slots(model: GPT) -> None:
    rng = random.Random(2)
    cache = DecodeCache(model)
    first = [Seq(4, rng) for _ in range(3)]
    step(model, cache, first)
    assert (cache.holding, cache.capacity) == (3, 4)
    more = [Seq(6, rng) for _ in range(6)]
    step(model, cache, [*first, *more])
    assert (cache.holding, cache.capacity) == (9, 16)
    for _ in range(3):
        step(model, cache, [*first, *more])  # the grown pool kept the first ones' keys
    step(model, cache, more[:2])
    assert (cache.holding, cache.capacity) == (2, 16)


def test_without_keeping_every_step_is_a_whole_context(model: GPT) -> None:
    rng = random.Random(3)
    cache = DecodeCache(model, keep=False)
    seqs = [Seq(2, rng), Seq(9, rng)]
    for _ in range(4):
        step(model, cache, seqs)
    assert (cache.holding, cache.capacity) == (0, 0)
