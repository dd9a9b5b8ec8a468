"""Watch streams are split into events by `watchcache.lines`, whatever block boundaries the network gives."""

from __future__ import annotations

import io

from tandem.operator.watchcache import lines


class Blocks(io.RawIOBase):
    """A reply whose `read1` returns the given blocks one at a time, as a socket would."""

    def __init__(self, *blocks: bytes) -> None:
        self._blocks = list(blocks)

    def read1(self, size: int = -1) -> bytes:
        return self._blocks.pop(0) if self._blocks else b""


def test_events_split_across_blocks_come_out_whole_and_in_order() -> None:
    stream = Blocks(b'{"type":"ADDED"}\n{"ty', b'pe":"MODIFIED"', b"}\n", b'{"type":"DELETED"}\n{"type":"B')
    assert list(lines(stream)) == [
        b'{"type":"ADDED"}',
        b'{"type":"MODIFIED"}',
        b'{"type":"DELETED"}',
        b'{"type":"B',  # cut off by the end of the stream: handed on, the parser reports it
    ]


def test_an_event_is_handed_on_as_soon_as_its_line_is_whole() -> None:
    """A quiet watch must not hold back an event until more data arrives."""
    stream = Blocks(b'{"type":"ADDED"}\n', b'{"type":"MODIFIED"}\n')
    events = lines(stream)
    assert next(events) == b'{"type":"ADDED"}'
    assert stream._blocks == [b'{"type":"MODIFIED"}\n']  # not read ahead


def test_blank_lines_are_skipped() -> None:
    assert list(lines(Blocks(b"\n\n", b'{"a":1}\n\n'))) == [b'{"a":1}']
