"""The causal-lm runtime's key/value cache against the model's own forward pass (real PyTorch, CPU): every
step's logits must equal those of the whole context run from scratch, while sequences join, leave and slide
past the window; a join must cost the new prompt only; greedy answers must equal the uncached model's. The
bucketed mode runs the decoding pass at the padded shapes that CUDA graphs capture (on CUDA), eagerly."""

from __future__ import annotations

import random
from typing import cast

import pytest
import torch

from tandem.workloads.models.gpt import GPT, Block, GPTConfig
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


def step(model: GPT, cache: DecodeCache, seqs: list[Seq]) -> list[int]:
    """One decoding step: the cache's logits must match a fresh forward pass of each whole window. The cache
    gets each sequence's whole token list, as the runtime passes it (it windows them itself). Returns the
    token positions that went through the model's first block during the cache's step, per pass."""
    seen, handle = token_rows(model)
    try:
        with torch.inference_mode():
            got = cache.logits(list(seqs), [s.ids for s in seqs])
    finally:
        handle.remove()
    with torch.inference_mode():
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(got[i], reference(model, seq.window), atol=1e-4, rtol=1e-4)
    for i, seq in enumerate(seqs):
        seq.ids.append(int(got[i].argmax()))
    return seen


MODES = {
    "split": {},
    "one-pass": {"one_pass": True},
    "bucketed": {"bucketed": True},
}


@pytest.mark.parametrize("mode", MODES)
def test_steps_match_the_whole_context_while_sequences_join_leave_and_slide(model: GPT, mode: str) -> None:
    rng = random.Random(1)
    cache = DecodeCache(model, **MODES[mode])
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


@pytest.mark.parametrize("mode", MODES)
def test_sequences_join_and_leave_at_every_step(model: GPT, mode: str) -> None:
    """Continuous batching at mixed lengths: every step some sequences leave (from anywhere in the batch,
    so slots are compacted) and new ones join the cached ones; every row's logits stay exact."""
    rng = random.Random(4)
    cache = DecodeCache(model, **MODES[mode])
    seqs = [Seq(rng.randrange(2, 9), rng) for _ in range(5)]
    for n in range(14):
        if n:
            for _ in range(rng.randrange(0, 3)):
                if len(seqs) > 1:
                    seqs.pop(rng.randrange(len(seqs)))
            for _ in range(rng.randrange(1, 4)):
                seqs.insert(rng.randrange(len(seqs) + 1), Seq(rng.randrange(2, 9), rng))
        step(model, cache, seqs)
        assert cache.holding == len(seqs), f"step {n}"


def token_rows(model: GPT) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Counts the token positions that pass through the first block at each call."""
    seen: list[int] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].shape[0] * args[0].shape[1])

    first = cast("Block", model.h[0])
    return seen, first.ln_1.register_forward_pre_hook(hook)


@pytest.mark.parametrize("mode", ["split", "bucketed"])
def test_a_join_runs_the_new_prompt_and_one_token_per_cached_row(model: GPT, mode: str) -> None:
    rng = random.Random(5)
    cache = DecodeCache(model, **MODES[mode])
    cached = [Seq(16, rng) for _ in range(6)]
    for _ in range(2):
        step(model, cache, cached)
    joining = Seq(5, rng)
    seqs = [*cached, joining]
    seen, handle = token_rows(model)
    try:
        with torch.inference_mode():
            got = cache.logits(list(seqs), [s.window for s in seqs])
    finally:
        handle.remove()
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(got[i], reference(model, seq.window), atol=1e-4, rtol=1e-4)
    # Op by op the prefill pads widths to multiples of 16 (WIDTH_STEP); bucketed, to 64, at most the window
    # (24 here). The 6 cached rows are padded to the batch bucket of 8 when bucketed.
    padded_prompt, decode_rows = (BLOCK, 8) if mode == "bucketed" else (16, 6)
    assert sorted(seen) == sorted([decode_rows, padded_prompt]), seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ahead", [False, True], ids=["step", "greedy_step"])
def test_greedy_answers_equal_the_uncached_models(model: GPT, mode: str, ahead: bool) -> None:
    """fp32: the cached runs choose the same tokens as whole contexts run from scratch, through the greedy
    choice made where the logits are (limited to the usable vocabulary), while sequences join and finish;
    also with `greedy_step`, whose decoding passes launched ahead (bucketed) serve the next steps."""
    vocab = 50

    def generate(cache: DecodeCache) -> list[list[int]]:
        rng = random.Random(6)
        waiting = [(Seq(rng.randrange(3, 12), rng), rng.randrange(2, 15)) for _ in range(9)]
        live: list[tuple[Seq, int]] = []  # (sequence, its length when finished)
        done: list[list[int]] = []
        with torch.inference_mode():
            while waiting or live:
                joining = rng.randrange(1, 4)
                live += [(s, len(s.ids) + n) for s, n in waiting[:joining]]
                del waiting[:joining]
                seqs = [s for s, _ in live]
                windows = [s.window for s in seqs]
                chosen = cache.greedy_step(seqs, windows) if ahead else cache.step(seqs, windows).greedy()
                for seq, token in zip(seqs, chosen, strict=True):
                    assert token < vocab
                    seq.ids.append(token)
                done += [s.ids for s, end in live if len(s.ids) == end]
                live = [(s, end) for s, end in live if len(s.ids) < end]
        return done

    expected = generate(DecodeCache(model, keep=False, vocab=vocab))
    assert generate(DecodeCache(model, vocab=vocab, **MODES[mode])) == expected


def test_a_pass_launched_ahead_serves_rows_that_went_on_and_is_redone_otherwise(model: GPT) -> None:
    rng = random.Random(7)
    cache = DecodeCache(model, bucketed=True)
    seqs = [Seq(5, rng), Seq(9, rng), Seq(7, rng), Seq(3, rng)]

    def greedy_step(seqs: list[Seq], *, other_token_for: int | None = None) -> None:
        with torch.inference_mode():
            chosen = cache.greedy_step(list(seqs), [s.ids for s in seqs])
        for i, (seq, token) in enumerate(zip(seqs, chosen, strict=True)):
            seq.ids.append((token + 1) % 64 if i == other_token_for else token)  # as if sampled

    greedy_step(seqs)
    greedy_step(seqs)
    seqs.pop(1)  # leaves: the others' rows of the pass launched ahead still hold
    assert step(model, cache, seqs) == [], "the step should have used the pass launched ahead, running none"
    greedy_step(seqs, other_token_for=2)
    # Row 2 went another way: the step decodes again, exactly (3 rows, padded to the batch bucket of 4).
    assert step(model, cache, seqs) == [4]
    greedy_step(seqs)
    seqs.append(Seq(6, rng))  # joins: prefilled alone, while the others use the pass launched ahead
    assert step(model, cache, seqs) == [BLOCK]


def test_cuda_graphs_need_a_cuda_model(model: GPT) -> None:
    with pytest.raises(ValueError, match="cuda_graphs=False"):
        DecodeCache(model, cuda_graphs=True)


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


def test_shapes_prepared_at_start_up_leave_every_later_step_exact(model: GPT) -> None:
    """The runtime's warm-up runs every decoding shape up to its largest batch (on CUDA: captures them);
    what those runs write into the pool must never reach a sequence cached afterwards."""
    cache = DecodeCache(model, bucketed=True)
    with torch.inference_mode():
        prepared = cache.prepare_shapes(20)
    # Batch buckets 1, 2, 4, 8, 16, 32 at widths 24 (the window): decoding passes, and prefills up to 16 rows.
    assert prepared == 6 + 5
    assert cache.capacity >= 32
    rng = random.Random(7)
    seqs = [Seq(rng.randrange(2, 9), rng) for _ in range(6)]
    for n in range(10):
        if n % 3 == 1:
            seqs.pop(rng.randrange(len(seqs)))
            seqs.append(Seq(rng.randrange(2, 9), rng))
        step(model, cache, seqs)
    with pytest.raises(ValueError, match="before any sequence is cached"):
        cache.prepare_shapes(4)
