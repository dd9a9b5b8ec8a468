"""Tokenizers: a byte-level one (every UTF-8 byte is a token, no file needed) and Hugging Face ones.

`HFTokenizer` wraps a `tokenizer.json` (the `tokenizers` library) behind the same interface; `train_bpe`
makes a byte-level BPE one from a corpus (`tandem tokenizer train`), since no model hub is reachable.

The byte tokenizer: token ids 0-255 are the bytes; `BOS`, `EOS` and `PAD` follow. The model's embedding
table is padded to a multiple of 64 (`padded_vocab_size`) so matmuls stay aligned; ids above `PAD`
are never produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

BYTE_VOCAB: Final = 256
BOS: Final = 256
EOS: Final = 257
PAD: Final = 258
VOCAB_SIZE: Final = 259
"""Ids the tokenizer can produce (bytes + specials)."""


def pad_vocab(size: int, multiple: int = 64) -> int:
    """`size` rounded up to a multiple of `multiple` (embedding tables are faster that way)."""
    return (size + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes in, token ids out; `decode` replaces invalid byte sequences with U+FFFD."""

    name: str = "tandem-byte"
    bos_id: int = BOS
    eos_id: int = EOS
    pad_id: int = PAD

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer produces (the model's table may be larger; see `padded_vocab_size`)."""
        return VOCAB_SIZE

    @property
    def padded_vocab_size(self) -> int:
        """The smallest embedding table (a multiple of 64) that holds every id."""
        return pad_vocab(VOCAB_SIZE)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (the training data path: no decoding, no specials)."""
        return list(data)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; special and out-of-range ids are dropped when `skip_special` (the default)."""
        out = bytearray()
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                out.append(i)
            elif not skip_special:
                out.extend(f"<|{self.special_name(i)}|>".encode())
        return out.decode("utf-8", errors="replace")

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """`decode` for each sequence."""
        return [self.decode(ids) for ids in batch]

    def special_name(self, token_id: int) -> str:
        """`bos`, `eos`, `pad` or `unused-N` for ids above the bytes."""
        return {self.bos_id: "bos", self.eos_id: "eos", self.pad_id: "pad"}.get(
            token_id, f"unused-{token_id}"
        )

    def to_dict(self) -> dict[str, object]:
        """What a checkpoint's metadata records about the tokenizer."""
        return {
            "name": self.name,
            "vocabSize": self.vocab_size,
            "bos": self.bos_id,
            "eos": self.eos_id,
            "pad": self.pad_id,
        }


EOT_TOKEN: Final = "<|endoftext|>"
"""The document separator (GPT-2's name), a special token of every tokenizer `train_bpe` makes."""


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a `tokenizer.json`), with `ByteTokenizer`'s interface.

    Why `tokenizers`: it reads the `tokenizer.json` every Hugging Face model ships, trains byte-level BPE in
    Rust, and encodes batches in parallel; a hand-written BPE would be slower and incompatible.
    """

    def __init__(self, tokenizer: Any, name: str = "tokenizer.json") -> None:
        self._tok = tokenizer
        self.name = name
        self.eos_id: int | None = tokenizer.token_to_id(EOT_TOKEN)
        self.bos_id: int | None = None
        self.pad_id: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Load a `tokenizer.json`; `ValueError` naming the file when it is not one."""
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)), name=Path(path).name)
        except Exception as exc:  # tokenizers raises a bare Exception for unparsable files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({exc})") from None

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer produces, special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab(self.vocab_size)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (encoded in parallel by the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        out: str = self._tok.decode(list(ids), skip_special_tokens=skip_special)
        return out

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def longest_token_chars(self) -> int:
        """The most characters one token decodes to, special tokens as written (`decode([id])`'s longest).

        A byte-level decoder (GPT-2's BPE, `train_bpe`'s) turns each character of a vocabulary entry into
        one byte (or, for an entry outside its alphabet, keeps the entry), and bytes decode to at most as
        many characters: no token decodes to more characters than its entry has. So only the entries
        longer than the best found so far are decoded, longest first: a 50k vocabulary's 50k decodes
        were most of the time of this scan. Other decoders promise no such bound: each id is decoded, in
        one call of the Rust library.
        """
        from tokenizers import decoders

        tok, size = self._tok, self.vocab_size
        if not isinstance(tok.decoder, decoders.ByteLevel):
            texts = tok.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
            return max(map(len, texts), default=0)
        bound = [len(tok.id_to_token(i) or "") for i in range(size)]  # None: an unused id
        best = 0
        for i in sorted(range(size), key=bound.__getitem__, reverse=True):
            if bound[i] <= best:
                break
            best = max(best, len(tok.decode([i], skip_special_tokens=False)))
        return best

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what checkpoints carry)."""
        out: str = self._tok.to_str()
        return out

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "vocabSize": self.vocab_size, "eos": self.eos_id, "file": "tokenizer.json"}


def train_bpe(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2, special_tokens: Sequence[str] = ()
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2's scheme: any text encodes, nothing is unknown).

    `EOT_TOKEN` is the first special token (id 0), the document separator of the data it tokenizes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOT_TOKEN, *(t for t in special_tokens if t != EOT_TOKEN)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


def load_tokenizer(path: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer in `path` (a `tokenizer.json`), or the byte tokenizer for None."""
    return ByteTokenizer() if path is None else HFTokenizer.from_file(path)
