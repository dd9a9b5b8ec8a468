"""A key/value cache for decoding with Tandem's GPT: each step computes one new token per sequence.

Without it every decoding step runs the whole context through the model again (cost grows with the
context); with it a sequence's keys and values stay in the cache between steps, and a step runs only the
newest token of each sequence, attending over its cached keys (the cost of the model per token, plus
attention over the context).

Layout: one pool, `(layers, 2, slots, heads, block_size, head_dim)`: keys and values together, each slot and
head's positions contiguous (the decoding attention's matrix products read them as whole rows; on `(slots,
positions, heads, head_dim)` they ran 6.5x slower at batch 256 on an H100), and a step writes every row's new
keys and values with one `index_copy_` per layer. A sequence owns one slot from its first step (the *prefill*:
its whole context in one pass, keys and values stored) until it leaves. The caller names sequences by object
(`GenSequence`); a sequence missing from a step has left (the generation scheduler runs every active sequence
at every step), so its slot is free again. Slots stay dense: the cached sequences own slots 0 to n - 1, and
when one leaves, the last slot's keys and values move into its hole (one copy of that sequence's cached
positions). So the cached rows of a step always read slots 0 to n - 1 as one view of the pool for every layer,
never a gather. The pool grows (doubling) when a step has more sequences than slots, and is never shrunk.

A step in which new sequences join cached ones runs two passes: the cached rows' newest tokens (one token
each, attending over their own lengths through a mask), then the new rows' whole contexts (right-padded
together, their keys and values stored in fresh slots). So a join costs its own prompt, not a pass over
every row's context.

On a GPU the decoding pass of a small model is bound by the CPU launching its operations (a 124M model's
bf16 step launches ~150 kernels in ~3.5 ms, and the card needs ~0.1 ms to read its weights). So on CUDA
the decoding pass and the prefill of joining rows are captured in CUDA graphs (`cuda_graphs`, default on for
CUDA; prefills over `PREFILL_GRAPH_TOKENS` stay op by op) for bucketed shapes:
the batch rounded up (1, 2, 4, 8, 16, then multiples of 16; padding rows attend to one position of a free
slot) and the attended width rounded up to a multiple of 64 (128 past 512 positions); a step copies its
tokens, positions and lengths into the graph's input buffers and replays it, and the greedy choice is made
inside the graph (`StepResult.greedy`), so only one id per row comes back to the CPU. Graphs are captured
on first use of a shape (tens of ms each, once) and share one memory pool; `reserve` sizes the pool up
front so that it never moves (a moved pool drops every graph). This is what vLLM and SGLang do for their
decode steps; their kernels also read each row's own length (paged attention), where this reads up to the
bucket's width with a mask.

`greedy_step` (the runtime's call when every row is greedy) launches the next decoding pass before it
returns the tokens, every cached row going on with the token just chosen, so the GPU computes it while the
caller handles those tokens (1.26-1.52x tokens/s for the in-process scheduler on an H100); the next step
uses it for the rows that did go on with those tokens (rows that left are dropped, new rows are prefilled)
and decodes again otherwise, overwriting what it wrote.

A context longer than `block_size` slides (older tokens drop out of the window, as `GPT.generate` does),
which shifts every position and so every cached key: such a sequence is recomputed whole at every step, as
without a cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from tandem.workloads.models.gpt import GPT, Block

#: Prefill widths are rounded up to a multiple of this (fewer distinct shapes for the attention kernels).
WIDTH_STEP = 16
#: A prefill of at most this many tokens at its bucketed shape (rows x width) runs as a CUDA graph; a larger
#: one runs op by op (its launch time is small beside its arithmetic, and a graph would hold its memory).
PREFILL_GRAPH_TOKENS = 16384
#: `prepare_shapes` prepares prefills of up to this many joining rows (under steady load a step has a few
#: joins; a burst of more meets its prefill shapes once, at first use).
PREPARED_PREFILL_ROWS = 16


def batch_bucket(n: int) -> int:
    """The captured batch size that holds `n` rows: 1, 2, 4, 8, 16, then multiples of 16."""
    if n <= 16:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 16) * 16


def width_bucket(n: int, block_size: int) -> int:
    """The captured attention width that holds `n` positions: multiples of 64, of 128 past 512."""
    step = 64 if n <= 512 else 128
    return min(-(-n // step) * step, block_size)


@dataclass
class _Slot:
    index: int
    cached: int = 0
    """Tokens of the context whose keys and values are in the slot (positions 0 to cached - 1)."""


@dataclass
class _Part:
    rows: list[int]
    """The caller's row of each of this part's outputs."""
    logits: torch.Tensor
    """`(len(rows), vocab)`, in the model's dtype or fp32."""
    greedy: torch.Tensor
    """`(len(rows),)`: the argmax over the usable vocabulary."""


@dataclass
class _Ahead:
    """A decoding pass launched before the caller asked for it (`greedy_step`): every cached row going on
    with the token just chosen for it. The next step uses its outputs if its rows did so."""

    rows: dict[object, tuple[int, int, int]]
    """owner -> (its row in the outputs, its context's length then, its newest token then)."""
    logits: torch.Tensor
    greedy: torch.Tensor


class StepResult:
    """One step's outputs, in the caller's row order: greedy ids (chosen on the device) or whole logits.

    Valid until the next step (the graphs' output buffers are reused)."""

    def __init__(self, size: int, parts: list[_Part]) -> None:
        self.size = size
        self._parts = parts

    def greedy(self) -> list[int]:
        """Each row's most likely usable token (one small copy to the CPU per part)."""
        if len(self._parts) == 1 and self._parts[0].rows == list(range(self.size)):
            return cast("list[int]", self._parts[0].greedy.tolist())
        out = [0] * self.size
        for part in self._parts:
            for row, token in zip(part.rows, part.greedy.tolist(), strict=True):
                out[row] = token
        return out

    def logits(self) -> torch.Tensor:
        """`(batch, vocab)` fp32, a fresh tensor the caller may change."""
        first = self._parts[0].logits
        out = torch.empty((self.size, first.shape[1]), dtype=torch.float32, device=first.device)
        for part in self._parts:
            if part.rows == list(range(self.size)):
                out.copy_(part.logits)
            else:
                out[torch.tensor(part.rows, device=first.device)] = part.logits.float()
        return out


class DecodeCache:
    """Next-token logits of many sequences, one step at a time, keeping each one's keys and values."""

    def __init__(
        self,
        model: GPT,
        *,
        keep: bool = True,
        one_pass: bool = False,
        vocab: int | None = None,
        cuda_graphs: bool | None = None,
        bucketed: bool | None = None,
    ) -> None:
        """`keep=False` caches nothing: every step runs every whole context (for comparison).

        `one_pass=True`: a step that has both new sequences and cached ones runs one pass of every whole
        context (keys and values stored again for all), as without a cache (for comparison; the default
        runs the cached rows' newest tokens, then the new rows' contexts).

        `vocab`: ids from 0 to vocab - 1 may be chosen by `StepResult.greedy` (default: the model's whole
        embedding table; a tokenizer's padded table has ids that are no tokens).

        `cuda_graphs`: capture the decoding pass in CUDA graphs (default: on for a CUDA model; refused
        elsewhere). `bucketed`: run the decoding pass at the graphs' padded shapes even without graphs
        (default: as `cuda_graphs`; tests use it to check the padding on a CPU)."""
        config = model.config
        device = model.wte.weight.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and keep
        if cuda_graphs and device.type != "cuda":
            raise ValueError(
                f"cuda_graphs needs a model on a CUDA device, not {device}; pass cuda_graphs=False"
            )
        self.model = model
        self.keep = keep
        self.one_pass = one_pass
        self.cuda_graphs = cuda_graphs
        self.bucketed = cuda_graphs if bucketed is None else bucketed
        self.vocab = vocab or config.vocab_size
        self.blocks = [cast("Block", block) for block in model.h]
        self.block_size = config.block_size
        self.heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self._device = device
        self._pool: torch.Tensor | None = None
        self._slots: dict[object, _Slot] = {}
        self._owners: list[object] = []  # the owner of each slot, 0 to holding - 1
        self._graphs: _Graphs | None = None
        self._ahead: _Ahead | None = None

    @property
    def capacity(self) -> int:
        """Slots in the pool (sequences it can hold without growing)."""
        return self._pool.shape[2] if self._pool is not None else 0

    @property
    def holding(self) -> int:
        """Sequences whose keys and values are cached now."""
        return len(self._slots)

    @functools.cached_property
    def slot_bytes(self) -> int:
        """Memory one sequence's slot takes (every layer's keys and values over the whole window). Fixed for
        the cache's life; computed once (the metrics read it after every step, and a torch module's
        attribute lookup is slow)."""
        size = self.model.wte.weight.element_size()
        return len(self.blocks) * 2 * self.heads * self.block_size * self.head_dim * size

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far (one per batch and width bucket met)."""
        return len(self._graphs.graphs) if self._graphs is not None else 0

    def reserve(self, sequences: int) -> None:
        """Grow the pool to hold `sequences` (rounded up to a batch bucket) now, before graphs are captured:
        growing later moves the pool and drops the graphs."""
        while self.capacity < batch_bucket(sequences):
            self._grow()

    def prepare_shapes(self, sequences: int) -> int:
        """Prepare now, at start-up, the shapes that steps of up to `sequences` rows will meet: the decoding
        pass at every batch bucket up to `sequences` and every width bucket, and the prefill of up to
        `PREPARED_PREFILL_ROWS` joining rows at every width bucket. On CUDA that captures their graphs,
        which otherwise happens at first use (tens of ms each, while every sequence in flight waits: seen
        under open-loop load as time-to-first-token and inter-token spikes whenever the batch reaches a new
        size or width); elsewhere (bucketed) it runs them once. It writes position 0 of the slots, so it
        runs before any sequence is cached (the runtime's warm-up). Returns the number of shapes run."""
        if self.holding:
            raise ValueError("DecodeCache.prepare_shapes runs before any sequence is cached")
        if not self.bucketed or not self.keep:
            return 0
        self.reserve(sequences)
        if self._graphs is None:
            self._graphs = _Graphs(self, self.capacity)
        graphs = self._graphs
        widths = sorted({width_bucket(n, self.block_size) for n in range(1, self.block_size + 1)})
        sizes = sorted({batch_bucket(n) for n in range(1, sequences + 1)})
        done = 0
        for size in sizes:
            for width in widths:
                inputs = torch.zeros((2, size), dtype=torch.long)
                inputs[1] = 1  # one position each (the first)
                graphs.run(size, width, inputs)
                done += 1
                if size <= PREPARED_PREFILL_ROWS and size * width <= PREFILL_GRAPH_TOKENS:
                    meta = torch.tensor([[1] * size, list(range(size))])
                    graphs.prefill(size, width, torch.zeros((size, width), dtype=torch.long), meta)
                    done += 1
        self._ahead = None
        return done

    def logits(self, owners: Sequence[object], contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Each context's next-token logits `(batch, vocab)`, fp32 (see `step`)."""
        return self.step(owners, contexts).logits()

    def step(self, owners: Sequence[object], contexts: Sequence[Sequence[int]]) -> StepResult:
        """Each context's next-token outputs.

        `owners[i]` names the sequence of `contexts[i]` across steps; `contexts[i]` is its tokens, one longer
        than at its previous step (its window, the last `block_size`, is what the model sees; passing the
        whole list spares the caller a copy per row and step: 0.2 ms a step at batch 256 and 200 tokens)."""
        if not owners:
            raise ValueError("DecodeCache.step needs at least one context")
        ahead, self._ahead = self._ahead, None
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
        if prefill and decode and self.one_pass:
            prefill, decode = list(range(len(owners))), []
        for i in prefill:  # recomputed whole: its old keys and values (if any) go
            if owners[i] in self._slots:
                self._release(owners[i])
        parts: list[_Part] = []
        # The cached rows first: the decoding pass writes at padding rows of free slots, which the new
        # rows' prefill may claim next.
        if decode:
            decoding = [owners[i] for i in decode], [contexts[i] for i in decode], decode
            done = self._decoded_ahead(ahead, *decoding) if ahead is not None else None
            parts.append(done or self._decode(*decoding))
        if prefill:
            windows = [contexts[i][-self.block_size :] for i in prefill]
            parts.append(self._prefill([owners[i] for i in prefill], windows, prefill))
        for i in decode:
            owner = owners[i]
            slot = self._slots[owner]
            slot.cached += 1
            if slot.cached == self.block_size:  # a full window: the next step slides it
                self._release(owner)
        return StepResult(len(owners), parts)

    def greedy_step(self, owners: Sequence[object], contexts: Sequence[Sequence[int]]) -> list[int]:
        """`step(...).greedy()`, then (at the bucketed shapes) the next decoding pass launched at once for
        every cached row with the token just chosen, so that the GPU computes it while the caller handles
        these tokens. The next step uses it for the rows that went on with those tokens (rows that left
        are dropped; new rows are prefilled as usual); otherwise it decodes again, overwriting it."""
        tokens = self.step(owners, contexts).greedy()
        if self.bucketed and self._owners and self.capacity >= batch_bucket(len(self._owners)):
            row_of = {owner: i for i, owner in enumerate(owners)}
            held = [(owner, self._slots[owner].cached + 1, tokens[row_of[owner]]) for owner in self._owners]
            lengths = [n for _, n, _ in held]
            size = batch_bucket(len(held))
            padding = size - len(held)
            inputs = torch.tensor([[t for _, _, t in held] + [0] * padding, lengths + [1] * padding])
            if self._graphs is None:
                self._graphs = _Graphs(self, self.capacity)
            logits, greedy = self._graphs.run(size, width_bucket(max(lengths), self.block_size), inputs)
            rows = {owner: (s, n, t) for s, (owner, n, t) in enumerate(held)}
            self._ahead = _Ahead(rows, logits[: len(held)], greedy[: len(held)])
        return tokens

    def _decoded_ahead(
        self, ahead: _Ahead, owners: Sequence[object], contexts: Sequence[Sequence[int]], rows_out: list[int]
    ) -> _Part | None:
        """The pass launched ahead, if every row went on with the token it assumed (else None)."""
        picks = []
        for owner, context in zip(owners, contexts, strict=True):
            hit = ahead.rows.get(owner)
            if hit is None or hit[1] != len(context) or hit[2] != context[-1]:
                return None
            picks.append(hit[0])
        if picks == list(range(len(picks))):
            return _Part(rows_out, ahead.logits[: len(picks)], ahead.greedy[: len(picks)])
        index = torch.tensor(picks, device=self._device)
        return _Part(rows_out, ahead.logits[index], ahead.greedy[index])

    # -- the two kinds of pass ----------------------------------------------------------------------

    def _prefill(
        self, owners: Sequence[object], contexts: Sequence[Sequence[int]], rows_out: list[int]
    ) -> _Part:
        """Whole contexts, right-padded into one batch; keys and values stored in fresh slots for those
        that fit the window."""
        device = self._device
        lengths = [len(c) for c in contexts]
        longest = max(lengths)
        width = min(-(-longest // WIDTH_STEP) * WIDTH_STEP, max(self.block_size, longest))
        # A context that fills the window may slide at the next step (then it is recomputed whole anyway);
        # one shorter than the window keeps its keys for the next step.
        storing = [i for i, n in enumerate(lengths) if n < self.block_size and self.keep]
        if storing:
            while self.capacity < len(self._owners) + len(storing):
                self._grow()
        first = len(self._owners)
        for i in storing:
            self._claim(owners[i], lengths[i])
        every = len(storing) == len(contexts)
        if self.bucketed and every:
            size = batch_bucket(len(contexts))
            padded = width_bucket(longest, self.block_size)
            if size * padded <= PREFILL_GRAPH_TOKENS:
                return self._prefill_bucketed(contexts, lengths, first, size, padded, rows_out)
        rows = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, context in enumerate(contexts):
            rows[i, : len(context)] = torch.tensor(context, dtype=torch.long)
        stored = None if every else torch.tensor(storing, dtype=torch.long, device=device)
        logits = self._prefill_pass(
            rows.to(device), torch.tensor(lengths, device=device), slice(first, first + len(storing)), stored
        )
        return _Part(rows_out, logits, logits[:, : self.vocab].argmax(dim=-1))

    def _prefill_bucketed(
        self,
        contexts: Sequence[Sequence[int]],
        lengths: list[int],
        first: int,
        size: int,
        width: int,
        rows_out: list[int],
    ) -> _Part:
        """The prefill at padded shapes (a CUDA graph on CUDA): padding rows repeat the last row, its slot
        too (the same keys and values written twice)."""
        count = len(contexts)
        rows = torch.zeros((size, width), dtype=torch.long)
        for i, context in enumerate(contexts):
            rows[i, : len(context)] = torch.tensor(context, dtype=torch.long)
        rows[count:] = rows[count - 1]
        last = [lengths[-1], first + count - 1]
        meta = torch.tensor(
            [
                [*lengths, *[last[0]] * (size - count)],
                [*range(first, first + count), *[last[1]] * (size - count)],
            ]
        )
        if self._graphs is None:
            self._graphs = _Graphs(self, self.capacity)
        logits, greedy = self._graphs.prefill(size, width, rows, meta)
        return _Part(rows_out, logits[:count], greedy[:count])

    def _prefill_pass(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor,
        slots: torch.Tensor | slice,
        stored: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits after each row's last token `(rows, vocab)`; keys and values of rows `stored` (None: all)
        written into `slots`."""
        model = self.model
        device = self._device
        width = idx.shape[1]
        x = model.wte(idx) + model.wpe(torch.arange(width, device=device))
        pool = self._pool
        storing = stored is None or len(stored) > 0
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.qkv(block.ln_1(x))
            if storing:
                assert pool is not None
                kv = torch.stack((k, v) if stored is None else (k[stored], v[stored]))
                pool[layer][:, slots, :, :width] = kv
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = block.after_attention(x, block.attn.project(attended))
        last = x[torch.arange(idx.shape[0], device=device), lengths - 1]
        logits: torch.Tensor = model.lm_head(model.ln_f(last))
        return logits

    def _decode(
        self, owners: Sequence[object], contexts: Sequence[Sequence[int]], rows_out: list[int]
    ) -> _Part:
        """The newest token of each cached context, attending over its slot; rows run in slot order."""
        batch = len(owners)
        assert batch == len(self._owners), "every cached sequence decodes (the others were released)"
        order = [0] * batch  # order[slot] = the row of `owners` in that slot
        for i, owner in enumerate(owners):
            order[self._slots[owner].index] = i
        lengths = [len(contexts[i]) for i in order]
        newest = [contexts[i][-1] for i in order]
        out_rows = [rows_out[i] for i in order]
        if not self.bucketed:
            inputs = torch.tensor([newest, lengths], device=self._device)
            logits = self._decode_pass(
                batch, max(lengths), inputs[0], inputs[1], masked=len(set(lengths)) > 1
            )
            return _Part(out_rows, logits, logits[:, : self.vocab].argmax(dim=-1))
        size = batch_bucket(batch)
        width = width_bucket(max(lengths), self.block_size)
        while self.capacity < size:
            self._grow()
        padding = size - batch  # rows of free slots: one position each (the first), never read by others
        inputs = torch.tensor([newest + [0] * padding, lengths + [1] * padding])
        if self._graphs is None:
            self._graphs = _Graphs(self, self.capacity)
        logits, greedy = self._graphs.run(size, width, inputs)
        return _Part(out_rows, logits[:batch], greedy[:batch])

    def _decode_pass(
        self, batch: int, width: int, newest: torch.Tensor, lengths: torch.Tensor, *, masked: bool
    ) -> torch.Tensor:
        """Rows 0 to batch - 1 of the pool, one new token each: keys and values written at position
        `lengths - 1`, attention over the first `width` positions (masked to each row's length).

        With a mask on a GPU the attention is two matrix products around a softmax: for one query per row
        on the cache's layout that is 1.4x SDPA's speed with a mask at batch 256 and width 320 on an H100
        (bench/serve_lm_decode_attention.py), and the same at batch 16. On a CPU, SDPA with a mask (bf16
        matrix products of this shape are 10x slower there), except at the bucketed shapes (which only
        tests run on a CPU: they check the GPU's computation)."""
        model = self.model
        device = self._device
        heads, block_size = self.heads, self.block_size
        positions = lengths - 1
        # (batch, 1, 1, width): each row attends to its cached positions and the new one.
        bias = mask = None
        if masked:
            beyond = torch.arange(width, device=device)[None, :] >= lengths[:, None]
            if device.type == "cpu" and not self.bucketed:
                mask = ~beyond[:, None, None, :]
            else:  # added to the scores
                bias = torch.zeros(beyond.shape, device=device).masked_fill_(beyond, -float("inf"))
                bias = bias[:, None, None, :]
        pool = self._pool
        assert pool is not None
        view = pool[:, :, :batch, :, :width]  # every layer's keys and values of these rows (sees the writes)
        # Each row and head's new position in a layer's flattened pool (slot = row).
        rows_heads = torch.arange(batch, device=device)[:, None] * heads + torch.arange(heads, device=device)
        where = (rows_heads * block_size + positions[:, None]).view(-1)
        x = (model.wte(newest) + model.wpe(positions))[:, None, :]
        scale = self.head_dim**-0.5
        for layer, block in enumerate(self.blocks):
            qkv = block.attn.packed_qkv(block.ln_1(x))[:, 0]  # (batch, 3, heads, head_dim): one token
            flat = pool[layer].view(2, -1, self.head_dim)
            flat.index_copy_(1, where, qkv[:, 1:].transpose(0, 1).reshape(2, -1, self.head_dim))
            keys, values = view[layer, 0], view[layer, 1]  # (batch, heads, width, head_dim)
            query = qkv[:, 0, :, None]  # (batch, heads, 1, head_dim)
            if bias is None:
                attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
            else:
                scores = torch.matmul(query, keys.transpose(-1, -2)).float() * scale + bias
                attended = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
            x = block.after_attention(x, block.attn.project(attended))
        logits: torch.Tensor = model.lm_head(model.ln_f(x[:, 0]))
        return logits

    # -- slots ------------------------------------------------------------------------------------

    def _claim(self, owner: object, length: int) -> None:
        """The next free slot (the pool has room), now caching `length` tokens of `owner`."""
        assert owner not in self._slots
        self._slots[owner] = _Slot(len(self._owners), length)
        self._owners.append(owner)

    def _release(self, owner: object) -> None:
        """Free `owner`'s slot; the last slot's sequence moves into it (slots stay dense)."""
        hole = self._slots.pop(owner).index
        last_owner = self._owners.pop()
        if last_owner is owner:
            return
        moved = self._slots[last_owner]
        # Its cached positions and the next one (which a pass launched ahead may have written).
        count = min(moved.cached + 1, self.block_size)
        assert self._pool is not None
        self._pool[:, :, hole, :, :count] = self._pool[:, :, moved.index, :, :count]
        moved.index = hole
        self._owners[hole] = last_owner

    def _grow(self) -> None:
        old = self.capacity
        new = max(4, 2 * old)
        weight = self.model.wte.weight
        shape = (len(self.blocks), 2, new, self.heads, self.block_size, self.head_dim)
        grown = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if self._pool is not None:
            grown[:, :, :old] = self._pool
        self._pool = grown
        self._graphs = None  # captured with the old pool's addresses
        self._ahead = None


class _Graphs:
    """The decoding pass at bucketed shapes: captured in CUDA graphs, or run eagerly at the same shapes.

    Inputs and outputs live in fixed buffers (a graph replays with the addresses it was captured with)."""

    def __init__(self, cache: DecodeCache, capacity: int) -> None:
        self.cache = cache
        device = cache._device
        self.inputs = torch.zeros((2, capacity), dtype=torch.long, device=device)
        self.inputs[1] = 1
        vocab = cache.model.lm_head.weight.shape[0]
        self.logits = torch.zeros((capacity, vocab), dtype=torch.float32, device=device)
        self.greedy = torch.zeros(capacity, dtype=torch.long, device=device)
        # The prefill's: token rows, then (lengths, slots); its own outputs (a step may have both passes).
        self.prefill_rows = torch.zeros((capacity, cache.block_size), dtype=torch.long, device=device)
        self.prefill_meta = torch.zeros((2, capacity), dtype=torch.long, device=device)
        self.prefill_logits = torch.zeros((capacity, vocab), dtype=torch.float32, device=device)
        self.prefill_greedy = torch.zeros(capacity, dtype=torch.long, device=device)
        self.graphs: dict[tuple[str, int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if cache.cuda_graphs else None

    def run(self, size: int, width: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `(size, vocab)` fp32 and greedy ids `(size,)` of the first `size` slots (views of the
        output buffers)."""
        self.inputs[:, :size].copy_(inputs, non_blocking=True)
        self._replay(("decode", size, width), self._body)
        return self.logits[:size], self.greedy[:size]

    def prefill(
        self, size: int, width: int, rows: torch.Tensor, meta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill of `rows` `(size, width)` with `meta` = (lengths, slots): logits and greedy ids."""
        self.prefill_rows[:size, :width].copy_(rows, non_blocking=True)
        self.prefill_meta[:, :size].copy_(meta, non_blocking=True)
        self._replay(("prefill", size, width), self._prefill_body)
        return self.prefill_logits[:size], self.prefill_greedy[:size]

    def _replay(self, key: tuple[str, int, int], make: Callable[[int, int], Callable[[], None]]) -> None:
        if not self.cache.cuda_graphs:
            make(key[1], key[2])()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(make(key[1], key[2]))
        graph.replay()

    def _prefill_body(self, size: int, width: int) -> Callable[[], None]:
        cache = self.cache
        rows, lengths, slots = (
            self.prefill_rows[:size, :width],
            self.prefill_meta[0, :size],
            self.prefill_meta[1, :size],
        )

        def body() -> None:
            logits = cache._prefill_pass(rows, lengths, slots, None)
            self.prefill_logits[:size].copy_(logits)
            torch.argmax(logits[:, : cache.vocab], dim=-1, out=self.prefill_greedy[:size])

        return body

    def _body(self, size: int, width: int) -> Callable[[], None]:
        cache = self.cache
        newest, lengths = self.inputs[0, :size], self.inputs[1, :size]

        def body() -> None:
            logits = cache._decode_pass(size, width, newest, lengths, masked=True)
            self.logits[:size].copy_(logits)
            torch.argmax(logits[:, : cache.vocab], dim=-1, out=self.greedy[:size])

        return body

    def _capture(self, body: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Warm-up runs on a side stream (as PyTorch's capture recipe asks) run the current step's inputs:
        # they write the same keys and values that the replay writes again.
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        return graph
