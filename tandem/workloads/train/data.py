"""Training text: bytes from a file, a directory or the built-in corpus, cut into fixed-length windows.

The sampler is a pure function of (seed, global sample index): sample `g` is window `perm_e[g % N]` of
epoch `e = g // N`, where `perm_e` is a seeded permutation of the `N` windows. Optimizer step `s` consumes
global samples `[s * global_batch, (s + 1) * global_batch)`, split over micro-batches and ranks, so the
data position is just the step number: resuming at step `s` continues with exactly the samples an
uninterrupted run would have seen, whatever happened before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

TEXT_SUFFIXES = (".txt", ".md", ".text", ".csv", ".json", ".jsonl", ".py", "")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def text_size(path: Path) -> int:
    """Bytes of training text at `path` (a file or a directory of text files)."""
    return sum(p.stat().st_size for p in _files(path))


def load_tokens(uri: str, *, data_root: str | None = None) -> npt.NDArray[np.uint8]:
    """The data set's tokens (bytes: the byte tokenizer's ids 0-255).

    A single file is memory-mapped (no copy); a directory's files are concatenated in path order with a
    newline between them.
    """
    from tandem.workloads.train.config import BUILTIN_CORPUS_SCHEME, resolve_data_uri

    if uri.startswith(BUILTIN_CORPUS_SCHEME):
        from tandem.workloads.data.corpus import builtin_corpus

        return np.frombuffer(builtin_corpus(uri.removeprefix(BUILTIN_CORPUS_SCHEME)), dtype=np.uint8)
    path = resolve_data_uri(uri, data_root=data_root)
    files = _files(path)
    if len(files) == 1 and path.is_file():
        return np.memmap(path, dtype=np.uint8, mode="r")
    return np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8)


@dataclass(frozen=True)
class DataPosition:
    """Where the sampler is: recorded in each checkpoint (`metadata.json` `"data"`)."""

    samples_consumed: int
    epoch: int
    windows: int
    seq_len: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "samplesConsumed": self.samples_consumed,
            "epoch": self.epoch,
            "windows": self.windows,
            "seqLen": self.seq_len,
            "seed": self.seed,
        }


class WindowSampler:
    """Deterministic, resumable sampling of `seq_len + 1`-token windows (inputs and shifted targets)."""

    def __init__(self, tokens: npt.NDArray[np.uint8], seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < 1:
            raise ValueError(f"data set of {len(tokens)} tokens is shorter than one sequence ({seq_len + 1})")
        self._perm_epoch = -1
        self._perm: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def _permutation(self, epoch: int) -> npt.NDArray[np.int64]:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._perm_epoch = epoch
        return self._perm

    def window_starts(self, first: int, count: int) -> npt.NDArray[np.int64]:
        """Token offsets of global samples `first .. first + count - 1`."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            g = first + i
            out[i] = self._permutation(g // self.windows)[g % self.windows] * self.seq_len
        return out

    def batch(self, first: int, count: int) -> npt.NDArray[np.int64]:
        """`(count, seq_len + 1)` token ids of samples `first ..`: inputs `[:, :-1]`, targets `[:, 1:]`."""
        starts = self.window_starts(first, count)
        return np.asarray(self.tokens[starts[:, None] + self._offsets[None, :]], dtype=np.int64)

    def position(self, samples_consumed: int) -> DataPosition:
        return DataPosition(
            samples_consumed, samples_consumed // self.windows, self.windows, self.seq_len, self.seed
        )


def micro_batch_first_sample(
    step: int, micro: int, rank: int, *, global_batch: int, per_device: int, world_size: int
) -> int:
    """Global index of the first sample of `rank`'s micro-batch `micro` in optimizer step `step`."""
    return step * global_batch + (micro * world_size + rank) * per_device
