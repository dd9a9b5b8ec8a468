"""Incremental text of a generated sequence: each step decodes only its new token, not the whole answer.

Decoding the whole answer again for every token costs O(answer) per token (O(answer^2) per answer); on an
H100 that was a third of the generation scheduler's time at 256 sequences in flight. Two decoders, chosen
by what the model offers:

- `ByteDecoder`, for models that say which bytes a token stands for (`token_bytes`, e.g. the byte-level
  tokenizer): the bytes go through Python's incremental UTF-8 decoder, which keeps an incomplete character
  until its last byte arrives. `errors="replace"` in both, so the concatenated pieces equal the one-shot
  decode of the whole answer, U+FFFD included.
- `WindowDecoder`, for any `decode(ids)` (subword tokenizers whose tokens merge into characters): the text of
  the tokens since the last emitted piece is decoded with and without the newest ones, and the difference is
  emitted once it does not end in U+FFFD (an incomplete character that the next token may complete); the
  technique of HF's `TextStreamer` and vLLM's detokenizer. The window is the tokens since the last piece, so a
  step costs a few tokens' decoding. Exact for tokenizers whose decode of a concatenation is the
  concatenation of the decodes at piece boundaries (byte-level BPE, WordPiece without cleanup); `finish`
  flushes whatever is held.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Protocol


class TextDecoder(Protocol):
    def push(self, token: int) -> str:
        """The text the sequence gained with `token` (appended to its ids by the caller); may be empty."""

    def finish(self) -> str:
        """The text still held back (an incomplete character at the end), once the sequence ends."""


class ByteDecoder:
    """Tokens as bytes through an incremental UTF-8 decoder."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        raw = self._bytes(token)
        utf8 = self._utf8
        if not utf8.buffer and raw.isascii():  # nothing held back: ASCII is itself (the common case)
            return raw.decode("ascii")
        return utf8.decode(raw)

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


class WindowDecoder:
    """Any `decode(ids)`, over the tokens since the last piece emitted (`ids` is the sequence's own list,
    which the caller extends; `start` is where the generated tokens begin)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], ids: list[int], start: int) -> None:
        self._decode = decode
        self._ids = ids
        self._prefix = start  # the window's start: tokens before it are text already emitted
        self._read = start  # tokens before this are emitted; from _prefix to here, as context

    def push(self, token: int) -> str:
        ids = self._ids
        before = self._decode(ids[self._prefix : self._read]) if self._read > self._prefix else ""
        after = self._decode(ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing complete yet
        self._prefix, self._read = self._read, len(ids)
        return after[len(before) :]

    def finish(self) -> str:
        ids = self._ids
        before = self._decode(ids[self._prefix : self._read]) if self._read > self._prefix else ""
        after = self._decode(ids[self._prefix :])
        self._prefix = self._read = len(ids)
        return after[len(before) :]


def text_decoder(model: object, ids: list[int], start: int) -> TextDecoder:
    """The decoder for one sequence of `model`: bytes when the model names each token's bytes, else windows
    of `model.decode`."""
    token_bytes = getattr(model, "token_bytes", None)
    if token_bytes is not None:
        return ByteDecoder(token_bytes)
    decode: Callable[[Sequence[int]], str] = model.decode  # type: ignore[attr-defined]
    return WindowDecoder(decode, ids, start)
