"""Watch streams are split into events by `watchcache.Lines`, whatever block boundaries the network gives."""

from __future__ import annotations

from collect import Collect

from tandem.operator.watchcache import Lines


def split(*blocks: bytes) -> list[bytes]:
    got = Collect()
    lines = Lines(got)
    for block in blocks:
        assert lines.feed(block)
    lines.close()
    return got.lines


def test_events_split_across_blocks_come_out_whole_and_in_order() -> None:
    assert split(b'{"type":"ADDED"}\n{"ty', b'pe":"MODIFIED"', b"}\n", b'{"type":"DELETED"}\n{"type":"B') == [
        b'{"type":"ADDED"}',
        b'{"type":"MODIFIED"}',
        b'{"type":"DELETED"}',
        b'{"type":"B',  # cut off by the end of the stream: handed on, the parser reports it
    ]


def test_an_event_is_handed_on_as_soon_as_its_line_is_whole() -> None:
    """A quiet watch must not hold back an event until more data arrives."""
    got = Collect()
    Lines(got).feed(b'{"type":"ADDED"}\n')
    assert got.lines == [b'{"type":"ADDED"}']


def test_blank_lines_are_skipped() -> None:
    assert split(b"\n\n", b'{"a":1}\n\n') == [b'{"a":1}']


def test_a_stop_ends_the_block_at_once() -> None:
    """When the reader says stop (the operator is shutting down), later lines are not handed on."""
    got = Collect(limit=2)
    assert not Lines(got).feed(b"1\n2\n3\n")
    assert got.lines == [b"1", b"2"]
