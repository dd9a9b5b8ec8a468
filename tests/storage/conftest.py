"""Fixtures of the storage tests: a real S3 HTTP server (moto's, as a child process) and a fresh bucket.

moto is the S3 stand-in because no real S3 is reachable where the tests run; the code under test talks
HTTP to it through `AWS_ENDPOINT_URL` as it would to AWS S3 or MinIO.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from s3server import MotoS3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> MotoS3Server:
    """The server, with this process's AWS settings pointing at it and nothing else to find."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture
def bucket(s3: MotoS3Server) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name
