"""`materialize(uri, cache_dir)`: a local path for a model or data URI; `s3://` downloaded into a cache.

Cache layout (one entry per URI and endpoint)::

    CACHE/
      minilm-3f2a9c0d1e4b/          a finished download (renamed into place in one step)
        .tandem-complete            completion marker (JSON: uri, objects, bytes, path), written last
        minilm/...                  the objects under the prefix, by their key below it (or the single object)
      .minilm-3f2a9c0d1e4b.lock     held (flock) while the entry is checked or downloaded
      .tmp-minilm-3f2a9c0d1e4b-*/   a download in progress (removed by the next caller holding the lock)

Credentials and endpoint come from the standard AWS settings: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(or any source boto3 knows: shared files, web identity, instance profile), AWS_ENDPOINT_URL (S3-compatible
storage such as MinIO or Ceph; path-style addressing is used then) and AWS_REGION.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlparse

from tandem.errors import UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".tandem-complete"
"""File in a cache entry written after every object: an entry without it is never used."""
PROGRESS_MIN_BYTES = 64 * 1024 * 1024
"""Downloads at least this large report progress on stderr (every 10%)."""


class StorageError(UserError):
    """A URI that cannot be read: the message names the URI and what to fix."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        """The last path component of the key (the bucket for a whole bucket): the local name."""
        return PurePosixPath(self.key.rstrip("/")).name or self.bucket


def default_cache_dir(env: str = "TANDEM_MODEL_CACHE", kind: str = "models") -> Path:
    """`$env` if set, else `$XDG_CACHE_HOME/tandem/KIND` (`~/.cache/tandem/KIND`), else a temp dir."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    if base.startswith("~"):  # no home directory (some containers)
        return Path(tempfile.gettempdir()) / f"tandem-{kind}"
    return Path(base) / "tandem" / kind


def materialize(
    uri: str,
    cache_dir: str | Path | None = None,
    *,
    what: str = "uri",
    credentials_hint: str = "",
    progress_min_bytes: int = PROGRESS_MIN_BYTES,
    progress: IO[str] | None = None,
) -> Path:
    """A local path for `uri`: `file:///x` and plain paths as they are, `s3://` downloaded into `cache_dir`.

    `what` names the setting in messages (`--model-uri`, `spec.trainer.builtin.dataset.uri`);
    `credentials_hint` is added to credential errors (where to put them in this context). Raises
    `StorageError` for an unsupported scheme and for every S3 failure (missing bucket or key, denied, no
    credentials, endpoint unreachable, disk full). Existence of local paths is the caller's check.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Path(uri).expanduser()
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{what} {uri!r}: file:// URIs must be local (file:///path)")
        return Path(unquote(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{what} {uri!r}: no bucket; write s3://BUCKET/KEY")
        location = S3Location(parsed.netloc, unquote(parsed.path.lstrip("/")))
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return _S3Download(
            location, cache, what, credentials_hint, progress_min_bytes, progress or sys.stderr
        ).run()
    raise StorageError(
        f"{what} {uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:///PATH or s3://BUCKET/KEY"
    )


# ------------------------------------------------------------------------------------------------
# S3
# ------------------------------------------------------------------------------------------------


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _entry_name(location: S3Location, endpoint: str | None) -> str:
    digest = hashlib.sha256(f"{endpoint or 'aws'}|{location.bucket}|{location.key}".encode()).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", location.name)[:60].lstrip(".") or "object"
    return f"{readable}-{digest[:12]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (other processes fetching the same URI wait for this one)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _safe_relative(key: str, prefix: str) -> PurePosixPath | None:
    """The key below the prefix as a relative path; None for folder markers; error for `..` tricks."""
    relative = key[len(prefix) :]
    if not relative or relative.endswith("/"):
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(relative)
    return PurePosixPath(*parts)


class _Progress:
    """Bytes downloaded so far; a line on stderr at every 10% of a big download (boto3 calls from threads)."""

    def __init__(self, uri: str, total: int, min_bytes: int, out: IO[str]) -> None:
        self.uri, self.total, self.out = uri, total, out
        self.enabled = total >= min_bytes and total > 0
        self.done = 0
        self.reported = 0  # tenths
        self.start = time.monotonic()
        self.lock = threading.Lock()
        if self.enabled:
            self._write(f"downloading {uri}: {_mb(total)}")

    def _write(self, text: str) -> None:
        self.out.write(f"tandem: {text}\n")
        self.out.flush()

    def __call__(self, count: int) -> None:
        with self.lock:
            self.done += count
            tenths = min(10, self.done * 10 // self.total) if self.total else 10
            if not self.enabled or tenths <= self.reported:
                return
            self.reported = tenths
            rate = self.done / max(time.monotonic() - self.start, 1e-6)
            self._write(f"downloading {self.uri}: {tenths * 10}% of {_mb(self.total)} ({_mb(int(rate))}/s)")


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


class _S3Download:
    def __init__(
        self,
        location: S3Location,
        cache: Path,
        what: str,
        credentials_hint: str,
        progress_min_bytes: int,
        progress: IO[str],
    ) -> None:
        self.location = location
        self.cache = cache
        self.what = what
        self.credentials_hint = credentials_hint
        self.progress_min_bytes = progress_min_bytes
        self.progress = progress
        self.endpoint = _endpoint()
        self.entry = cache / _entry_name(location, self.endpoint)

    def fail(self, problem: str) -> StorageError:
        return StorageError(f"{self.what} {self.location.uri!r}: {problem}")

    # -- the cache ---------------------------------------------------------------------------------

    def finished(self) -> Path | None:
        """The path of a complete entry, else None."""
        try:
            marker = json.loads((self.entry / COMPLETE_MARKER).read_text())
            path = self.entry / marker["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path if path.exists() else None

    def run(self) -> Path:
        found = self.finished()
        if found is not None:
            return found
        lock = self.cache / f".{self.entry.name}.lock"
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            lock.touch()
        except OSError as exc:
            raise self.fail(
                f"cannot write to the cache directory {self.cache} ({exc}); point it at a writable directory"
            ) from None
        with _locked(lock):
            found = self.finished()  # another process may have finished it while we waited
            if found is not None:
                return found
            # Whatever is left is a download that did not finish (its process died): start over.
            for stale in self.cache.glob(f".tmp-{self.entry.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(self.entry, ignore_errors=True)
            return self.download()

    # -- the download ------------------------------------------------------------------------------

    def client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise self.fail(
                f"reading s3:// needs boto3 ({exc.name} is missing): pip install 'tandem[workloads]'"
            ) from None
        addressing = "path" if self.endpoint else "auto"  # MinIO, Ceph and moto serve path-style
        config = Config(
            connect_timeout=10,
            read_timeout=60,
            retries={"mode": "standard"},  # AWS_MAX_ATTEMPTS still applies
            s3={"addressing_style": addressing},
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=_region(), config=config
        )

    def listing(self, client: Any) -> tuple[list[tuple[str, PurePosixPath, int]], bool]:
        """(key, local path below the entry, size) of every object to fetch; True if a single object."""
        loc = self.location
        prefix = loc.key.rstrip("/") + "/" if loc.key.rstrip("/") else ""
        objects: list[tuple[str, PurePosixPath, int]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                try:
                    relative = _safe_relative(obj["Key"], prefix)
                except ValueError:
                    raise self.fail(
                        f"object key {obj['Key']!r} has an empty, '.' or '..' path part and cannot be "
                        "stored as a file; rename it in the bucket"
                    ) from None
                if relative is not None:
                    objects.append((obj["Key"], PurePosixPath(loc.name) / relative, int(obj["Size"])))
        if objects or not loc.key or loc.key.endswith("/"):
            if not objects:
                raise self.fail(
                    f"no objects under {prefix or 'the bucket'} in bucket {loc.bucket!r}; check the key"
                )
            return objects, False
        from botocore.exceptions import ClientError

        try:
            head = client.head_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise self.fail(
                    f"no object {loc.key!r} and no objects under {loc.key.rstrip('/')}/ in bucket "
                    f"{loc.bucket!r}; check the key (s3://BUCKET/KEY names one object or a prefix)"
                ) from None
            raise
        return [(loc.key, PurePosixPath(loc.name), int(head["ContentLength"]))], True

    def download(self) -> Path:
        started = time.monotonic()
        client = self.client()  # first: a missing boto3 is explained there
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            objects, single = self.listing(client)
            total = sum(size for _, _, size in objects)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.entry.name}-", dir=self.cache))
            tmp.chmod(0o755)  # mkdtemp makes it private; the published entry is read like any download
            try:
                progress = _Progress(self.location.uri, total, self.progress_min_bytes, self.progress)
                for key, relative, _size in objects:
                    target = tmp / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(self.location.bucket, key, str(target), Callback=progress)
                result = PurePosixPath(self.location.name)
                marker = {
                    "uri": self.location.uri,
                    "endpoint": self.endpoint,
                    "objects": len(objects),
                    "bytes": total,
                    "single": single,
                    "path": str(result),
                    "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
                os.rename(tmp, self.entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except ClientError as exc:
            raise self.explain_client_error(exc) from None
        except BotoCoreError as exc:
            raise self.explain_botocore_error(exc) from None
        except Boto3Error as exc:  # a transfer that failed after its retries (the connection broke)
            raise self.fail(f"the download from {self.where()} failed ({exc}); try again") from None
        except OSError as exc:
            raise self.fail(
                f"cannot write the download into {self.cache} ({exc}); free disk space or use another "
                "cache directory"
            ) from None
        log.info(
            "fetched %s: %d object(s), %s in %.1f s -> %s",
            self.location.uri,
            len(objects),
            _mb(total),
            time.monotonic() - started,
            self.entry / result,
        )
        return self.entry / result

    # -- errors --------------------------------------------------------------------------------------

    def where(self) -> str:
        return f"the S3 endpoint {self.endpoint}" if self.endpoint else "AWS S3"

    def explain_client_error(self, exc: Any) -> StorageError:
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        bucket = self.location.bucket
        if code == "NoSuchBucket":
            return self.fail(
                f"bucket {bucket!r} does not exist at {self.where()}; check the bucket name "
                "(and AWS_ENDPOINT_URL for S3-compatible storage)"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return self.fail(
                f"{self.where()} rejected the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY{self.credentials_hint}"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled", "Forbidden"):
            return self.fail(
                f"access denied by {self.where()} ({message}); the credentials need s3:ListBucket on "
                f"bucket {bucket!r} and s3:GetObject on its objects{self.credentials_hint}"
            )
        if code in _WRONG_REGION:
            return self.fail(f"the bucket is in another region ({message}); set AWS_REGION to its region")
        return self.fail(f"{self.where()} answered {code}: {message}")

    def explain_botocore_error(self, exc: Exception) -> StorageError:
        from botocore.exceptions import (
            ConnectionError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
        )

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return self.fail(
                f"no S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(and AWS_ENDPOINT_URL for S3-compatible storage){self.credentials_hint}"
            )
        if isinstance(exc, ConnectionError):
            return self.fail(
                f"cannot reach {self.where()} ({exc}); check AWS_ENDPOINT_URL and that the storage is "
                "reachable from here"
            )
        if isinstance(exc, NoRegionError):
            return self.fail(f"no region ({exc}); set AWS_REGION")
        return self.fail(f"the S3 request failed ({exc})")


_WRONG_REGION = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
)


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )
