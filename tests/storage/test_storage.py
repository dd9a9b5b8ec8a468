"""`tandem.workloads.storage.materialize` against a real S3 HTTP server (seconds; not in tests/unit: the
server is a child process and every call makes real HTTP requests).

No real S3 is reachable where these tests run, so moto's server (`python -m moto.server`, started as a
child process on a free port) is the S3 stand-in: boto3 talks signed HTTP to it exactly as to AWS S3 or
MinIO, through `AWS_ENDPOINT_URL`. Nothing in the code under test is mocked.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from s3server import MotoS3Server

from tandem.errors import UserError
from tandem.workloads.storage import COMPLETE_MARKER, StorageError, materialize

MODEL_FILES = {
    "config.json": b'{"dim": 4}',
    "weights/part-0.bin": bytes(range(256)) * 40,
    "weights/part-1.bin": b"\x01" * 5000,
}


def put_model(s3: MotoS3Server, bucket: str, prefix: str = "team/minilm") -> None:
    client = s3.client()
    for name, body in MODEL_FILES.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
    client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")  # a console-made "folder"
    client.put_object(Bucket=bucket, Key=f"{prefix}-other/x.bin", Body=b"not part of the model")


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_prefix_is_downloaded_with_its_layout(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    put_model(s3, bucket)
    path = materialize(f"s3://{bucket}/team/minilm", tmp_path)
    assert path.name == "minilm"  # the model's own name (the server's default model name)
    assert tree(path) == MODEL_FILES  # not the sibling prefix, not the folder marker
    marker = json.loads((path.parent / COMPLETE_MARKER).read_text())
    assert marker["uri"] == f"s3://{bucket}/team/minilm"
    assert (marker["objects"], marker["bytes"]) == (3, sum(len(b) for b in MODEL_FILES.values()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # A trailing slash names the same prefix.
    assert tree(materialize(f"s3://{bucket}/team/minilm/", tmp_path / "again")) == MODEL_FILES


def test_a_single_object_is_downloaded_as_a_file(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=bucket, Key="resnet/model.pt", Body=b"torchscript bytes")
    path = materialize(f"s3://{bucket}/resnet/model.pt", tmp_path)
    assert path.is_file()
    assert (path.name, path.read_bytes()) == ("model.pt", b"torchscript bytes")


def test_a_finished_copy_is_reused_without_asking_s3(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    put_model(s3, bucket)
    first = materialize(f"s3://{bucket}/team/minilm", tmp_path)
    client = s3.client()
    for name in MODEL_FILES:  # gone from S3: only the cache can answer now
        client.delete_object(Bucket=bucket, Key=f"team/minilm/{name}")
    second = materialize(f"s3://{bucket}/team/minilm", tmp_path)
    assert second == first
    assert tree(second) == MODEL_FILES


def test_an_unfinished_download_is_never_used_and_is_redone(
    s3: MotoS3Server, bucket: str, tmp_path: Path
) -> None:
    put_model(s3, bucket)
    path = materialize(f"s3://{bucket}/team/minilm", tmp_path)
    entry = path.parent
    # What a process killed mid-download leaves: no marker, a truncated file, a staging directory.
    (entry / COMPLETE_MARKER).unlink()
    (path / "weights" / "part-0.bin").write_bytes(b"trunc")
    stale = tmp_path / f".tmp-{entry.name}-dead"
    (stale / "minilm").mkdir(parents=True)
    again = materialize(f"s3://{bucket}/team/minilm", tmp_path)
    assert again == path
    assert tree(again) == MODEL_FILES
    assert (entry / COMPLETE_MARKER).exists()
    assert not stale.exists()


def test_concurrent_callers_share_one_download(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    put_model(s3, bucket)
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(materialize(f"s3://{bucket}/team/minilm", tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 4
    assert len(set(results)) == 1
    assert tree(results[0]) == MODEL_FILES
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [results[0].parent.name]


def test_big_downloads_report_progress(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    put_model(s3, bucket)
    out = io.StringIO()
    materialize(f"s3://{bucket}/team/minilm", tmp_path, progress_min_bytes=1, progress=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"tandem: downloading s3://{bucket}/team/minilm: ")
    assert "100% of" in lines[-1]
    quiet = io.StringIO()
    materialize(f"s3://{bucket}/team/minilm", tmp_path / "small", progress=quiet)
    assert quiet.getvalue() == ""  # below the threshold: no progress lines


def fails(uri: str, cache: Path, **kwargs: Any) -> str:
    with pytest.raises(StorageError) as info:
        materialize(uri, cache, what="--model-uri", **kwargs)
    assert isinstance(info.value, UserError)  # printed without a traceback by `tandem`
    message = str(info.value)
    assert message.startswith(f"--model-uri {uri!r}: "), message
    return message


def test_a_missing_key_names_the_uri_and_the_fix(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    put_model(s3, bucket)
    message = fails(f"s3://{bucket}/team/minilm-v2", tmp_path)
    assert "no object 'team/minilm-v2' and no objects under team/minilm-v2/" in message
    assert "check the key" in message
    assert "no objects under nothing/" in fails(f"s3://{bucket}/nothing/", tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing half-made


def test_a_missing_bucket_names_the_bucket(s3: MotoS3Server, tmp_path: Path) -> None:
    message = fails("s3://no-such-bucket-here/model", tmp_path)
    assert "bucket 'no-such-bucket-here' does not exist" in message
    assert s3.url in message


def test_no_credentials_says_which_variables_to_set(
    s3: MotoS3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = fails(f"s3://{bucket}/model", tmp_path, credentials_hint=" (in a pod: a Secret)")
    assert "no S3 credentials" in message
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert message.endswith(" (in a pod: a Secret)")


def test_an_unreachable_endpoint_names_it(
    s3: MotoS3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3server import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    message = fails(f"s3://{bucket}/model", tmp_path)
    assert f"cannot reach the S3 endpoint {url}" in message
    assert "AWS_ENDPOINT_URL" in message


def test_keys_that_would_escape_the_cache_are_refused(s3: MotoS3Server, bucket: str, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=bucket, Key="m/a//b.bin", Body=b"x")
    assert "empty, '.' or '..' path part" in fails(f"s3://{bucket}/m", tmp_path / "cache")


def test_local_uris_are_returned_as_they_are(tmp_path: Path) -> None:
    assert materialize(f"file://{tmp_path}/model") == tmp_path / "model"
    assert materialize(str(tmp_path / "model")) == tmp_path / "model"
    assert materialize("relative/dir") == Path("relative/dir")
    with pytest.raises(StorageError, match="file:// URIs must be local"):
        materialize("file://otherhost/x")
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        materialize("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        materialize("s3:///key")
