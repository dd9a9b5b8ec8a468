"""Checkpoint directories: written to a staging directory, published atomically, last K kept.

Layout of a checkpoint root (the run document's `checkpointUri`, a shared volume)::

    ROOT/
      step-00000050/          one complete checkpoint per published step
        model.pt              model state_dict (fp32, no DDP prefix)      } built-in trainer
        optimizer.pt          optimizer state_dict (AdamW)                }
        trainer_state.pt      scheduler, grad scaler, RNG states per rank }
        state.pt              the user entrypoint's state (instead of the three above)
        metadata.json         step, epoch, loss, time, job, model config, data position, file sizes + CRC32
        COMPLETE              completion marker, written last
      .staging-step-...       a checkpoint being written (ignored; removed by the next run)

Publishing: every file is written (with its CRC32 computed while writing) and fsynced in the staging
directory, then `metadata.json`, then the `COMPLETE` marker; the staging directory is renamed to
`step-NNNNNNNN` and the root fsynced. A directory without `COMPLETE` is ignored; one whose files do not
match their recorded size or CRC (or whose metadata does not parse) is skipped with a warning and the
previous checkpoint is used. Torch is imported only by the functions that save or load tensors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
MODEL_FILE: Final = "model.pt"
OPTIMIZER_FILE: Final = "optimizer.pt"
TRAINER_STATE_FILE: Final = "trainer_state.pt"
USER_STATE_FILE: Final = "state.pt"
METADATA_FILE: Final = "metadata.json"
MARKER_FILE: Final = "COMPLETE"
STAGING_PREFIX: Final = ".staging-"
_NAME_RE = re.compile(r"^step-(\d{8,})$")
_CHUNK = 8 << 20


class CorruptCheckpoint(Exception):
    """A complete-looking checkpoint whose contents do not match its metadata."""


def probe_writable(root: str) -> None:
    """Make the checkpoint root `root` (a path or a file:// URI) and write a probe file in it, before Ray
    or torch start; an OSError says why not (the callers name the setting that chose the root)."""
    path = Path(root.removeprefix("file://"))
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".tandem-write-check-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def uri_to_path(uri: str) -> Path:
    """`file:///a/b` or a plain path -> Path."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        raise ValueError(f"checkpoint URI {uri!r}: only file:// URIs (a mounted volume) are supported")
    return Path(uri)


def path_to_uri(path: Path) -> str:
    return "file://" + str(path.resolve())


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rfc3339(ts: float | None = None) -> str:
    """UTC time in RFC 3339 (`2026-11-26T10:00:00Z`)."""
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CheckpointRef:
    """A published checkpoint directory."""

    step: int
    path: Path

    @property
    def uri(self) -> str:
        return path_to_uri(self.path)


def list_checkpoints(root: Path) -> list[CheckpointRef]:
    """Checkpoints that carry the completion marker, oldest first (contents not verified)."""
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _NAME_RE.match(child.name)
        if m and child.is_dir():
            if (child / MARKER_FILE).is_file():
                out.append(CheckpointRef(int(m.group(1)), child))
            else:
                log.info(
                    "ignoring checkpoint %s: no %s marker (interrupted while writing)", child, MARKER_FILE
                )
    return sorted(out, key=lambda r: r.step)


def read_metadata(path: Path) -> dict[str, Any]:
    """The parsed `metadata.json` of a checkpoint directory."""
    data = json.loads((path / METADATA_FILE).read_text())
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{path / METADATA_FILE} is not a JSON object")
    return data


def _crc32_file(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(ref: CheckpointRef) -> dict[str, Any]:
    """Check a checkpoint against its metadata (sizes and CRC32 of every file); return the metadata."""
    try:
        meta = read_metadata(ref.path)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{ref.path}: unreadable {METADATA_FILE} ({exc})") from exc
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(f"{ref.path}: {METADATA_FILE} lists no files")
    for name, info in files.items():
        p = ref.path / name
        if not p.is_file():
            raise CorruptCheckpoint(f"{ref.path}: {name} is missing")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise CorruptCheckpoint(f"{ref.path}: {name} has {size} bytes, metadata says {info.get('bytes')}")
        if _crc32_file(p) != info.get("crc32"):
            raise CorruptCheckpoint(f"{ref.path}: {name} fails its CRC32 check")
    return meta


def latest_complete(root: Path, *, prefer: str | None = None, check: bool = True) -> CheckpointRef | None:
    """The newest complete, intact checkpoint under `root`, or `prefer` (a checkpoint URI) when it is
    complete and newer than all of them (e.g. one outside `root`).

    A preferred checkpoint never wins over a newer complete one: Ray's last recorded checkpoint, or the
    one the operator last saw, can lag behind storage, and resuming from it would lose more than one
    checkpoint interval. Corrupted checkpoints are skipped with a warning, falling back to older ones.
    """
    candidates = list(list_checkpoints(root))
    if prefer:
        p = uri_to_path(prefer)
        m = _NAME_RE.match(p.name)
        if m and (p / MARKER_FILE).is_file():
            if all(c.path.resolve() != p.resolve() for c in candidates):
                candidates.append(CheckpointRef(int(m.group(1)), p))
        else:
            log.warning(
                "resume checkpoint %s is not a complete checkpoint; using the newest one in %s", prefer, root
            )
    candidates.sort(key=lambda c: c.step, reverse=True)
    for ref in candidates:
        if not check:
            return ref
        try:
            verify(ref)
        except CorruptCheckpoint as exc:
            log.warning("skipping corrupted checkpoint: %s; falling back to the previous one", exc)
            continue
        return ref
    return None


class _CrcWriter:
    """A binary file wrapper that computes the CRC32 and size of what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.crc = 0
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.crc = zlib.crc32(data, self.crc)
        n = self._f.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """A checkpoint being written; `publish` makes it visible atomically."""

    def __init__(self, root: Path, step: int) -> None:
        self.root = root
        self.step = step
        self.path = root / f"{STAGING_PREFIX}{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(parents=True)
        self.files: dict[str, dict[str, int]] = {}

    def save_torch(self, name: str, obj: Any) -> None:
        """`torch.save(obj)` into the checkpoint, recording size and CRC32."""
        import torch

        with (self.path / name).open("wb") as f:
            w = _CrcWriter(f)
            torch.save(obj, w)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        self.files[name] = {"bytes": w.size, "crc32": w.crc}

    def write_bytes(self, name: str, data: bytes) -> None:
        with (self.path / name).open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files[name] = {"bytes": len(data), "crc32": zlib.crc32(data)}

    @property
    def nbytes(self) -> int:
        return sum(v["bytes"] for v in self.files.values())

    def publish(self, metadata: dict[str, Any]) -> CheckpointRef:
        """Write metadata and the marker, rename into place, fsync; return the published checkpoint."""
        meta = {
            "format": FORMAT_VERSION,
            "step": self.step,
            "time": rfc3339(),
            **metadata,
            "files": self.files,
        }
        (self.path / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with (self.path / METADATA_FILE).open("rb") as f:
            os.fsync(f.fileno())
        marker = self.path / MARKER_FILE
        marker.write_text(json.dumps({"step": self.step, "time": meta["time"]}) + "\n")
        with marker.open("rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(self.path)
        final = self.root / checkpoint_name(self.step)
        if final.exists():  # re-reached after a restart from an older checkpoint: replace it
            old = self.root / f"{STAGING_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            self.path.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(final)
        _fsync_dir(self.root)
        return CheckpointRef(self.step, final)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def staging(root: Path, step: int) -> Iterator[Staging]:
    """A `Staging` that is removed if the block raises (the marker is never written then)."""
    st = Staging(root, step)
    try:
        yield st
    except BaseException:
        st.abort()
        raise


def prune(root: Path, keep: int, *, protect: Collection[int] = ()) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and those of the steps in `protect` (the
    best evaluation's); return what was deleted."""
    done = list_checkpoints(root)
    doomed = [r.path for r in done[: max(0, len(done) - keep)] if r.step not in protect]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def clean_staging(root: Path) -> None:
    """Remove staging directories left by an interrupted writer (call before a run writes any)."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(STAGING_PREFIX) and child.is_dir():
                log.info("removing interrupted checkpoint write %s", child)
                shutil.rmtree(child, ignore_errors=True)
