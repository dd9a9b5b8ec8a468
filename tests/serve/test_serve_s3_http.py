"""`tandem serve --model-uri s3://...`: a real server process loads a TorchScript model that it downloads
from an S3 server, then answers real HTTP requests with it.

No real S3 is reachable where the tests run, so moto's server (`python -m moto.server`, a child process on
a free port) is the S3 stand-in; the model server reaches it through `AWS_ENDPOINT_URL` and the AWS
credential variables, exactly as a replica reaches S3 or MinIO with `spec.model.credentialsSecret`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from s3server import MotoS3Server
from serverprocess import ServerProcess

from tandem.workloads.storage import COMPLETE_MARKER

MODEL_JSON = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


def scripted_model(path: Path) -> None:
    """y = 2x + 1: outputs that prove which model answered."""
    import torch

    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0 + 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        torch.jit.script(Affine()).save(str(path))  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def s3_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoS3Server, str]]:
    work = tmp_path_factory.mktemp("upload")
    scripted_model(work / "model.pt")
    with MotoS3Server() as s3:
        client = s3.client()
        client.create_bucket(Bucket="tandem-models")
        client.upload_file(str(work / "model.pt"), "tandem-models", "vision/doubler/model.pt")
        client.put_object(
            Bucket="tandem-models", Key="vision/doubler/model.json", Body=json.dumps(MODEL_JSON).encode()
        )
        yield s3, "s3://tandem-models/vision/doubler"


def test_the_server_serves_a_model_downloaded_from_s3(
    s3_model: tuple[MotoS3Server, str], tmp_path: Path
) -> None:
    s3, uri = s3_model
    cache = tmp_path / "cache"
    args = [
        "--runtime",
        "torchscript",
        "--model-uri",
        uri,
        "--model-cache-dir",
        str(cache),
        "--device",
        "cpu",
    ]
    env = {**s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}
    with ServerProcess(args, env=env) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        # The model is named after the S3 prefix, as it would be after a local directory.
        assert client.get("/v2/models/doubler").json()["inputs"] == MODEL_JSON["inputs"]
        body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [0, 1, 2, -1, 0.5, 4]}]}
        response = client.post("/v2/models/doubler/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [1.0, 3.0, 5.0, -1.0, 2.0, 9.0]
        assert f"fetched {uri}: 2 object(s)" in server.log()
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (entry / COMPLETE_MARKER).exists()
    assert sorted(p.name for p in (entry / "doubler").iterdir()) == ["model.json", "model.pt"]


def test_a_missing_model_stops_the_server_with_the_reason(
    s3_model: tuple[MotoS3Server, str], tmp_path: Path
) -> None:
    s3, uri = s3_model
    args = ["--runtime", "torchscript", "--model-uri", uri + "-v2", "--model-cache-dir", str(tmp_path)]
    server = ServerProcess(args, env={**s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}, startup_timeout_s=60)
    with pytest.raises(RuntimeError, match="did not start") as info:
        server.start()
    assert f"--model-uri '{uri}-v2': no object 'vision/doubler-v2'" in str(info.value)
