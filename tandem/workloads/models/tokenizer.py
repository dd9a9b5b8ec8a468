"""A byte-level tokenizer: every UTF-8 byte is a token, plus a few special tokens. No downloads.

Token ids 0-255 are the bytes; `BOS`, `EOS` and `PAD` follow. The model's embedding table is padded to a
multiple of 64 (`padded_vocab_size`) so matmuls stay aligned; ids above `PAD` are never produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

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
