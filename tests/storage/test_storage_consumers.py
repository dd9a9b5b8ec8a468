"""The users of `materialize`: `tandem serve --model-uri s3://...` and `s3://` training data sets, against
the moto S3 server (the S3 stand-in, see conftest.py)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3server import MotoS3Server

from tandem.api.serving import ServerOptions
from tandem.errors import UserError
from tandem.workloads.serve import cli
from tandem.workloads.train.config import from_spec, resolve_data_uri
from tandem.workloads.train.data import load_tokens


def parse(*argv: str) -> ServerOptions:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return cli.options_from(parser.parse_args(["serve", *argv]))


def test_serve_downloads_an_s3_model_into_the_cache_dir(
    s3: MotoS3Server, bucket: str, tmp_path: Path
) -> None:
    s3.client().put_object(Bucket=bucket, Key="vision/resnet/model.pt", Body=b"weights")
    args = parse(
        "--runtime", "torchscript", "--model-uri", f"s3://{bucket}/vision/resnet",
        "--model-cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    config = cli.build_config(args)
    assert config.model.name == "resnet"  # the prefix's last part, as for a local directory
    assert config.model.path.parent.parent == tmp_path / "cache"
    assert (config.model.path / "model.pt").read_bytes() == b"weights"


def test_serve_cache_dir_defaults_to_tandem_model_cache(
    s3: MotoS3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.client().put_object(Bucket=bucket, Key="m/model.pt", Body=b"w")
    monkeypatch.setenv("TANDEM_MODEL_CACHE", str(tmp_path / "from-env"))
    config = cli.build_config(parse("--runtime", "torchscript", "--model-uri", f"s3://{bucket}/m/model.pt"))
    assert config.model.path.read_bytes() == b"w"
    assert config.model.path.is_relative_to(tmp_path / "from-env")


def test_serve_errors_name_the_flag_and_the_fix(
    s3: MotoS3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ["--model-cache-dir", str(tmp_path)]
    with pytest.raises(UserError, match=r"--model-uri 's3://.*/nope': no object 'nope'"):
        cli.build_config(parse("--runtime", "torchscript", "--model-uri", f"s3://{bucket}/nope", *cache))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(UserError, match=r"no S3 credentials.*spec\.model\.credentialsSecret"):
        cli.build_config(parse("--runtime", "torchscript", "--model-uri", f"s3://{bucket}/m", *cache))


SPEC: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "s3://x/y"}, "maxSteps": 5}},
    "precision": "fp32",
    "batch": {"perDevice": 2},
}


def test_an_s3_data_set_is_checked_and_read_from_the_cache(
    s3: MotoS3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TANDEM_DATA_CACHE", raising=False)
    client = s3.client()
    client.put_object(Bucket=bucket, Key="text/a.txt", Body=b"a" * 300)
    client.put_object(Bucket=bucket, Key="text/b.txt", Body=b"b" * 300)
    spec = copy.deepcopy(SPEC)
    spec["trainer"]["builtin"]["dataset"]["uri"] = f"s3://{bucket}/text"
    cfg = from_spec(spec, job_name="j", data_root=str(tmp_path))
    assert cfg.dataset_uri == f"s3://{bucket}/text"  # every worker pod fetches it into its own cache
    path = resolve_data_uri(f"s3://{bucket}/text", data_root=str(tmp_path))
    assert path.is_relative_to(tmp_path / ".s3-cache")  # under the data root, downloaded once
    tokens = load_tokens(f"s3://{bucket}/text", data_root=str(tmp_path))
    assert isinstance(tokens, np.ndarray)  # text through the byte tokenizer: one array
    assert bytes(tokens) == b"a" * 300 + b"\n" + b"b" * 300


def test_a_missing_s3_data_set_names_the_field(
    s3: MotoS3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_DATA_CACHE", str(tmp_path))
    spec = copy.deepcopy(SPEC)
    spec["trainer"]["builtin"]["dataset"]["uri"] = f"s3://{bucket}/missing.txt"
    with pytest.raises(UserError, match=r"spec\.trainer\.builtin\.dataset\.uri 's3://.*': no object"):
        from_spec(spec, job_name="j")
