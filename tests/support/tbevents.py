"""Reads TensorBoard event files back (the tests' check of what `spec.tracking.tensorboard` wrote).

The files are TFRecord streams (a little-endian u64 length, its masked CRC, the record, its masked CRC)
of `Event` protocol buffers; tensorboardX ships the message definitions but no reader, and the
`tensorboard` package would bring a server with it.
"""

from __future__ import annotations

import struct
from pathlib import Path


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file in `logdir` (later files win for a repeated step)."""
    from tensorboardX.proto.event_pb2 import Event  # type: ignore[import-untyped]

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out
