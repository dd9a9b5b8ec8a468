"""Training tokens (token files, text or JSONL: `tandem.workloads.data.sources`) cut into windows.

The sampler is a pure function of (seed, global sample index): sample `g` is window `perm_e[g % N]` of
epoch `e = g // N`, where `perm_e` is a seeded permutation of the `N` windows. Optimizer step `s` consumes
global samples `[s * global_batch, (s + 1) * global_batch)`, split over micro-batches and ranks, so the
data position is just the step number: resuming at step `s` continues with exactly the samples an
uninterrupted run would have seen, whatever happened before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tandem.workloads.data.sources import (
    DataSource,
    Tokens,
    encode_documents,
    read_tokens,
    split_validation,
)
from tandem.workloads.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from tandem.workloads.train.config import TrainConfig


def load_tokens(
    uri: str,
    *,
    data_root: str | None = None,
    data_format: str = "auto",
    token_dtype: str = "uint16",
    tokenizer_uri: str | None = None,
    text_field: str = "text",
) -> Tokens:
    """The data set's token ids (`tandem.workloads.data.sources`; the built-in corpus is bytes).

    A single byte-text or token file is memory-mapped (no copy).
    """
    from tandem.workloads.train.config import BUILTIN_CORPUS_SCHEME, resolve_data_uri

    tokenizer = None if tokenizer_uri is None else resolve_data_uri(tokenizer_uri, data_root=data_root)
    if uri.startswith(BUILTIN_CORPUS_SCHEME):
        from tandem.workloads.data.corpus import builtin_corpus

        text = builtin_corpus(uri.removeprefix(BUILTIN_CORPUS_SCHEME))
        if tokenizer is None:
            return np.frombuffer(text, dtype=np.uint8)
        return encode_documents([text.decode()], load_tokenizer(tokenizer))
    path = resolve_data_uri(uri, data_root=data_root)
    return read_tokens(DataSource(path, data_format, token_dtype, tokenizer, text_field))


def cfg_tokens(cfg: TrainConfig, uri: str, data_root: str | None) -> Tokens:
    """`load_tokens` with the dataset settings of a run's config."""
    return load_tokens(
        uri,
        data_root=data_root,
        data_format=cfg.data_format,
        token_dtype=cfg.token_dtype,
        tokenizer_uri=cfg.tokenizer_uri,
        text_field=cfg.text_field,
    )


def train_and_validation(cfg: TrainConfig, data_root: str | None) -> tuple[Tokens, Tokens | None]:
    """The run's training tokens and its held-out tokens (None without `dataset.validation`)."""
    assert cfg.dataset_uri is not None
    tokens = cfg_tokens(cfg, cfg.dataset_uri, data_root)
    if cfg.validation_uri is not None:
        return tokens, cfg_tokens(cfg, cfg.validation_uri, data_root)
    if cfg.validation_fraction is not None:
        return split_validation(tokens, cfg.validation_fraction)
    return tokens, None


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

    def __init__(self, tokens: Tokens, seq_len: int, seed: int, *, vocab_size: int | None = None) -> None:
        self.tokens = tokens
        #: When set, every batch is checked on the host (an out-of-range id would crash a GPU's lookup).
        self.vocab_size = vocab_size
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
        out = np.asarray(self.tokens[starts[:, None] + self._offsets[None, :]], dtype=np.int64)
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            raise ValueError(
                f"token id {int(out.max())} in samples {first}..{first + count - 1} is not below "
                f"spec.trainer.builtin.dataset.vocabSize ({self.vocab_size}): set vocabSize to the "
                "vocabulary that made the data, or fix tokenDtype"
            )
        return out

    def position(self, samples_consumed: int) -> DataPosition:
        return DataPosition(
            samples_consumed, samples_consumed // self.windows, self.windows, self.seq_len, self.seed
        )


def micro_batch_first_sample(
    step: int, micro: int, rank: int, *, global_batch: int, per_device: int, world_size: int
) -> int:
    """Global index of the first sample of `rank`'s micro-batch `micro` in optimizer step `step`."""
    return step * global_batch + (micro * world_size + rank) * per_device
