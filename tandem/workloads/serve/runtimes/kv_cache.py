"""A key/value cache for decoding with Tandem's GPT: each step computes one new token per sequence.

Without it every decoding step runs the whole context through the model again (cost grows with the
context); with it a sequence's keys and values stay in the cache between steps, and a step runs only the
newest token of each sequence, attending over its cached keys (the cost of the model per token, plus
attention over the context).

Layout: one pool, `(layers, 2, slots, block_size, heads, head_dim)`: keys and values together, and slot and
position adjacent, so a step writes every row's new keys and values with one `index_copy_` per layer. A
sequence owns one slot from its first step (the *prefill*: its whole context in one pass, keys and values
stored) until it leaves. The caller names sequences by object (`GenSequence`); a sequence missing from a
step has left (the generation scheduler runs every active sequence at every step), so its slot is free
again. Sequences take the lowest free slot, so a batch often owns a run of consecutive slots, which a step
then reads as one view for every layer instead of a copy per layer. (On a GPU a small model's decoding step
is bound by the CPU launching operations, so every operation per layer counts.) The pool grows (doubling)
when a step has more sequences than slots, and is never shrunk.

A context longer than `block_size` slides (older tokens drop out of the window, as `GPT.generate` does),
which shifts every position and so every cached key: such a sequence is recomputed whole at every step, as
without a cache.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from tandem.workloads.models.gpt import GPT, Block

#: Prefill widths are rounded up to a multiple of this (fewer distinct shapes for the attention kernels).
WIDTH_STEP = 16


@dataclass
class _Slot:
    index: int
    cached: int = 0
    """Tokens of the context whose keys and values are in the slot (positions 0 to cached - 1)."""


class DecodeCache:
    """Next-token logits of many sequences, one step at a time, keeping each one's keys and values."""

    def __init__(self, model: GPT, *, keep: bool = True, one_pass: bool | None = None) -> None:
        """`keep=False` caches nothing: every step runs every whole context (for comparison).

        `one_pass`: how a step that has both new sequences and cached ones runs. True: one pass of every
        whole context (keys and values stored again for all), as without a cache; False: the new ones'
        contexts, then the others' newest tokens, two passes. On a GPU a small model's pass costs the CPU
        time of launching its operations whatever its size, so one pass wins; on a CPU the arithmetic is
        the cost, so computing only what is new wins. Default: True on a GPU, False on a CPU."""
        config = model.config
        self.model = model
        self.keep = keep
        self.one_pass = model.wte.weight.device.type != "cpu" if one_pass is None else one_pass
        self.blocks = [cast("Block", block) for block in model.h]
        self.block_size = config.block_size
        self.heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self._pool: torch.Tensor | None = None
        self._slots: dict[object, _Slot] = {}
        self._free: list[int] = []  # a heap: the lowest free slot first

    @property
    def capacity(self) -> int:
        """Slots in the pool (sequences it can hold without growing)."""
        return self._pool.shape[2] if self._pool is not None else 0

    @property
    def holding(self) -> int:
        """Sequences whose keys and values are cached now."""
        return len(self._slots)

    def logits(self, owners: list[object], contexts: list[list[int]]) -> torch.Tensor:
        """Each context's next-token hidden state through the LM head: `(batch, vocab)`, fp32.

        `owners[i]` names the sequence of `contexts[i]` across steps; `contexts[i]` is its window (at most
        `block_size` tokens), one token longer than at its previous step."""
        if not owners:
            raise ValueError("DecodeCache.logits needs at least one context")
        present = set(owners)
        for owner in [o for o in self._slots if o not in present]:
            self._release(owner)
        decode: list[int] = []
        prefill: list[int] = []
        for i, (owner, context) in enumerate(zip(owners, contexts, strict=True)):
            slot = self._slots.get(owner)
            if slot is not None and slot.cached == len(context) - 1:
                decode.append(i)
            else:
                prefill.append(i)
        if not prefill:  # the usual step: one pass, rows in order
            return self._decode(owners, contexts)
        if not decode or self.one_pass:
            return self._prefill(owners, contexts)
        out: torch.Tensor | None = None
        for rows, run in ((prefill, self._prefill), (decode, self._decode)):
            part = run([owners[i] for i in rows], [contexts[i] for i in rows])
            if out is None:
                out = part.new_empty((len(contexts), part.shape[1]))
            out[torch.tensor(rows, device=part.device)] = part
        assert out is not None
        return out

    # -- the two kinds of pass ----------------------------------------------------------------------

    def _prefill(self, owners: list[object], contexts: list[list[int]]) -> torch.Tensor:
        """Whole contexts, right-padded into one batch; keys and values stored for those that fit a slot."""
        model = self.model
        device = model.wte.weight.device
        lengths = [len(c) for c in contexts]
        longest = max(lengths)
        width = min(-(-longest // WIDTH_STEP) * WIDTH_STEP, max(self.block_size, longest))
        rows = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, context in enumerate(contexts):
            rows[i, : len(context)] = torch.tensor(context, dtype=torch.long)
        idx = rows.to(device)
        # A context that fills the window may slide at the next step (then it is recomputed whole anyway);
        # one shorter than the window keeps its keys for the next step.
        storing = [i for i, n in enumerate(lengths) if n < self.block_size and self.keep]
        stored = torch.tensor(storing, dtype=torch.long, device=device)
        slots = torch.tensor([self._claim(owners[i], lengths[i]) for i in storing], device=device)
        for owner, n in zip(owners, lengths, strict=True):
            if n >= self.block_size and owner in self._slots:
                self._release(owner)
        x = model.wte(idx) + model.wpe(torch.arange(width, device=device))
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.qkv(block.ln_1(x))
            if storing:
                assert self._pool is not None
                self._pool[layer, :, slots, :width] = torch.stack((k[stored], v[stored])).transpose(2, 3)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = block.after_attention(x, block.attn.project(attended))
        last = x[torch.arange(len(contexts), device=device), torch.tensor(lengths, device=device) - 1]
        logits: torch.Tensor = model.lm_head(model.ln_f(last)).float()
        return logits

    def _decode(self, owners: list[object], contexts: list[list[int]]) -> torch.Tensor:
        """The newest token of each context, attending over its cached keys and values."""
        model = self.model
        device = model.wte.weight.device
        slots_of = [self._slots[o] for o in owners]
        first = slots_of[0].index
        run = all(slot.index == first + i for i, slot in enumerate(slots_of))
        lengths_list = [len(c) for c in contexts]
        longest = max(lengths_list)
        # One copy to the device per step: slot, length and newest token of each row.
        rows = torch.tensor(
            [[s.index for s in slots_of], lengths_list, [c[-1] for c in contexts]], device=device
        )
        slots, lengths, newest = rows[0], rows[1], rows[2]
        positions = lengths - 1
        # (batch, 1, 1, longest): each row attends to its own cached positions and the new one; none
        # needed when every row is as long as the longest.
        mask = None
        if min(lengths_list) < longest:
            mask = (torch.arange(longest, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        pool = self._pool
        assert pool is not None
        batch = len(owners)
        # Consecutive slots: one view of every layer's keys and values (it sees the writes below).
        run_of = pool[:, :, first : first + batch, :longest] if run else None
        where = slots * self.block_size + positions  # each row's new position in a layer's flattened pool
        x = (model.wte(newest) + model.wpe(positions))[:, None, :]
        for layer, block in enumerate(self.blocks):
            qkv = block.attn.packed_qkv(block.ln_1(x))[:, 0]  # (batch, 3, heads, head_dim): one token
            flat = pool[layer].view(2, -1, self.heads, self.head_dim)
            flat.index_copy_(1, where, qkv[:, 1:].transpose(0, 1))
            cached = (run_of[layer] if run_of is not None else pool[layer, :, slots, :longest]).transpose(
                2, 3
            )
            attended = F.scaled_dot_product_attention(
                qkv[:, 0, :, None], cached[0], cached[1], attn_mask=mask
            )
            x = block.after_attention(x, block.attn.project(attended))
        for owner, slot in zip(owners, slots_of, strict=True):
            slot.cached += 1
            if slot.cached == self.block_size:  # a full window: the next step slides it
                self._release(owner)
        logits: torch.Tensor = model.lm_head(model.ln_f(x[:, 0])).float()
        return logits

    # -- slots ------------------------------------------------------------------------------------

    def _claim(self, owner: object, length: int) -> int:
        """The owner's slot (the lowest free one, after growing the pool if none), now caching `length`
        tokens."""
        slot = self._slots.get(owner)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._slots[owner] = _Slot(heapq.heappop(self._free))
        slot.cached = length
        return slot.index

    def _release(self, owner: object) -> None:
        heapq.heappush(self._free, self._slots.pop(owner).index)

    def _grow(self) -> None:
        old = self.capacity
        new = max(4, 2 * old)
        weight = self.model.wte.weight
        shape = (len(self.blocks), 2, new, self.block_size, self.heads, self.head_dim)
        grown = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if self._pool is not None:
            grown[:, :, :old] = self._pool
        self._pool = grown
        for index in range(old, new):
            heapq.heappush(self._free, index)
