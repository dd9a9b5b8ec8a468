"""Reading a data set into one array of token ids: token files, text and JSONL through a tokenizer.

- Token files (`format: tokens`, or `.bin` under `auto`): nanoGPT's layout, a headerless array of
  `uint16` (or `uint32`) ids. The integer type comes from the spec (`dataset.tokenDtype`), not from a file
  beside the data: nanoGPT writes none for its `.bin` files (only a pickled `meta.pkl` for character-level
  sets, which is unsafe to load), the spec is validated before anything runs and shows in `kubectl get -o
  yaml`, and the same `train.bin` then works unchanged. Files are memory-mapped (no copy); a directory's
  `.bin` shards are read as one sequence in path order (`ConcatTokens`).
- Text and JSONL: documents (a text file, or one JSON line's `textField`) encoded by the tokenizer and
  joined with its end-of-text id (`<|endoftext|>`; the byte tokenizer's `eos`), as GPT-2's data was. The
  byte tokenizer on plain text keeps its old layout (the raw bytes, files joined by a newline), so
  existing runs resume bit for bit. Encoding happens in every rank at start-up: pre-tokenize large corpora
  once with `tandem tokenizer encode` and train on the `.bin`.

Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from tandem.workloads.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TokenArray = npt.NDArray[np.unsignedinteger]
"""Token ids: uint8 (bytes), uint16 or uint32."""


class ConcatTokens:
    """Several token arrays (memory-mapped shards) read as one, without copying them into memory.

    Supports what the sampler and the split use: `len`, integer-array indexing (any shape; windows may
    cross shard boundaries) and contiguous slices (a `ConcatTokens` of views). Why not `np.concatenate`:
    it copies every shard into each rank's memory (8 ranks x a 20 GB data set).
    """

    def __init__(self, parts: list[TokenArray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.dtype = parts[0].dtype
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: npt.NDArray[np.int64] | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("ConcatTokens supports contiguous slices only")
            pieces = []
            for part, first in zip(self.parts, self.starts[:-1], strict=False):
                lo, hi = max(start - first, 0), min(stop - first, len(part))
                if lo < hi:
                    pieces.append(part[lo:hi])
            return ConcatTokens(pieces) if pieces else np.empty(0, dtype=self.dtype)
        flat = np.asarray(index, dtype=np.int64).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.parts[k][flat[mask] - self.starts[k]]
        return out.reshape(np.shape(index))


Tokens = TokenArray | ConcatTokens
"""A data set's token ids: one array, or memory-mapped shards read as one."""

TEXT_SUFFIXES: Final = (".txt", ".md", ".text", ".csv", ".json", ".jsonl", ".py", "")
DTYPES: Final = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class DataSource:
    """How to read one data set (the `spec.trainer.builtin.dataset` fields, URIs already resolved)."""

    path: Path
    format: str = "auto"
    token_dtype: str = "uint16"
    tokenizer: Path | None = None
    text_field: str = "text"

    @property
    def kind(self) -> str:
        """`tokens`, `jsonl` or `text`; `auto` by the suffix of the file (or of all the directory's files)."""
        if self.format != "auto":
            return self.format
        suffixes = {p.suffix for p in files_of(self.path, all_files=True)} or {self.path.suffix}
        if suffixes == {".bin"}:
            return "tokens"
        if suffixes == {".jsonl"}:
            return "jsonl"
        return "text"


def files_of(path: Path, *, all_files: bool = False) -> list[Path]:
    """The data files at `path`: itself, or a directory's files in path order (hidden ones skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and (all_files or p.suffix in TEXT_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def token_files(path: Path) -> list[Path]:
    """The `.bin` files of a token data set (the file itself when `path` is one)."""
    return [path] if path.is_file() else [p for p in files_of(path, all_files=True) if p.suffix == ".bin"]


def read_tokens(source: DataSource) -> Tokens:
    """All token ids of the data set, in order."""
    kind = source.kind
    if kind == "tokens":
        dtype = DTYPES[source.token_dtype]
        files = token_files(source.path)
        arrays: list[TokenArray] = [np.memmap(p, dtype=dtype, mode="r") for p in files]
        return arrays[0] if len(arrays) == 1 else ConcatTokens(arrays)
    tokenizer = load_tokenizer(source.tokenizer)
    files = files_of(source.path)
    if kind == "text" and isinstance(tokenizer, ByteTokenizer):
        if len(files) == 1 and source.path.is_file():
            return np.memmap(source.path, dtype=np.uint8, mode="r")
        return np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8)
    documents = (
        [p.read_text(encoding="utf-8", errors="replace") for p in files]
        if kind == "text"
        else [doc for p in files for doc in jsonl_documents(p, source.text_field)]
    )
    return encode_documents(documents, tokenizer)


def jsonl_documents(path: Path, field: str) -> list[str]:
    """The `field` string of every line of a JSONL file; `ValueError` naming the line otherwise."""
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc})") from None
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{path}:{number}: no string under {field!r} (spec.trainer.builtin.dataset.textField "
                    f"names the key of each line's text; this line has {keys})"
                )
            out.append(text)
    return out


def encode_documents(documents: list[str], tokenizer: ByteTokenizer | HFTokenizer) -> TokenArray:
    """The documents' ids, each followed by the end-of-text id (when the tokenizer has one)."""
    eos = tokenizer.eos_id
    if isinstance(tokenizer, HFTokenizer):
        encoded = tokenizer.encode_batch(documents)
    else:
        encoded = [tokenizer.encode(d) for d in documents]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    parts = [np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype) for ids in encoded]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def split_validation(tokens: Tokens, fraction: float) -> tuple[Tokens, Tokens]:
    """(train, held out): the last `fraction` of the tokens is held out (views, no copy)."""
    held = int(len(tokens) * fraction)
    cut = len(tokens) - held
    return tokens[:cut], tokens[cut:]


def check_token_file(path: Path, dtype: str, vocab_size: int, *, field: str, sample: int = 1 << 24) -> int:
    """Tokens in a token file; `ValueError` naming `field` when its size or ids do not fit the spec.

    Checks the first `sample` ids (16M: a fraction of a second) against `vocab_size`: an id out of range
    would crash the embedding lookup on a GPU with an opaque device-side assert.
    """
    width = np.dtype(DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size % width:
        raise ValueError(
            f"{field}: {path} has {size} bytes, not a whole number of {dtype} tokens; is it a token file, "
            f"and is spec.trainer.builtin.dataset.tokenDtype right?"
        )
    ids = np.memmap(path, dtype=DTYPES[dtype], mode="r")
    if len(ids):
        top = int(ids[:sample].max())
        if top >= vocab_size:
            raise ValueError(
                f"{field}: {path} holds token id {top}, not below spec.trainer.builtin.dataset.vocabSize "
                f"({vocab_size}): set vocabSize to the vocabulary that made the file (or the tokenizer), "
                f"or fix tokenDtype ({dtype})"
            )
    return len(ids)
