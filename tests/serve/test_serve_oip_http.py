"""The Open Inference Protocol over real HTTP, serving a TorchScript model this module writes."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverprocess import ServerProcess

MODEL_JSON = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "scale", "datatype": "FP32", "shape": [-1, 1]},
    ],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "total", "datatype": "FP32", "shape": [-1]},
    ],
}


def write_model(directory: Path) -> None:
    import torch

    class Affine(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.linear(x) * scale
            return y, y.sum(dim=1)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        torch.jit.script(Affine()).save(str(directory / "model.pt"))  # type: ignore[no-untyped-call]
    (directory / "model.json").write_text(json.dumps(MODEL_JSON))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("affine")
    write_model(directory)
    args = [
        "--runtime", "torchscript", "--model-uri", f"file://{directory}", "--model-name", "affine",
        "--device", "cpu", "--max-batch-size", "8", "--max-queue-delay-ms", "20",
    ]  # fmt: skip
    with ServerProcess(args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def request(x: list[list[float]], scale: list[float] | None = None) -> dict[str, Any]:
    scale = scale if scale is not None else [1.0] * len(x)
    return {
        "id": "r1",
        "inputs": [
            {"name": "x", "shape": [len(x), 4], "datatype": "FP32", "data": [v for row in x for v in row]},
            {"name": "scale", "shape": [len(x), 1], "datatype": "FP32", "data": scale},
        ],
    }


def outputs(response: httpx.Response) -> dict[str, np.ndarray[Any, Any]]:
    assert response.status_code == 200, response.text
    return {
        o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"])
        for o in response.json()["outputs"]
    }


def test_health_ready_and_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/affine/ready").status_code == 200
    assert client.get("/v2/models/affine/versions/1/ready").status_code == 200
    meta = client.get("/v2/models/affine").json()
    assert meta == {
        "name": "affine",
        "versions": ["1"],
        "platform": "pytorch_torchscript",
        "inputs": MODEL_JSON["inputs"],
        "outputs": MODEL_JSON["outputs"],
    }
    assert client.get("/v2/models/nope").status_code == 404


def test_infer_computes_every_row(client: httpx.Client) -> None:
    x = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 2.0, 8.0]]
    response = client.post("/v2/models/affine/infer", json=request(x, [1.0, 2.0, 3.0]))
    got = outputs(response)
    body = response.json()
    assert body["model_name"] == "affine"
    assert body["id"] == "r1"
    assert got["y"].shape == (3, 4)
    assert got["total"].shape == (3,)
    np.testing.assert_allclose(got["total"], got["y"].sum(axis=1), rtol=1e-5)
    # row 1 is the bias alone, scaled by 2; compare with row 1 computed alone
    alone = outputs(client.post("/v2/models/affine/infer", json=request([x[1]], [2.0])))
    np.testing.assert_allclose(got["y"][1], alone["y"][0], rtol=1e-6)


def test_requested_outputs_only(client: httpx.Client) -> None:
    body = request([[1.0, 1.0, 1.0, 1.0]]) | {"outputs": [{"name": "total"}]}
    response = client.post("/v2/models/affine/infer", json=body)
    assert [o["name"] for o in response.json()["outputs"]] == ["total"]


def test_concurrent_requests_batch_and_match(server: ServerProcess, client: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(24, 4)).astype(np.float32).tolist()
    alone = [outputs(client.post("/v2/models/affine/infer", json=request([r])))["y"][0] for r in rows]
    multi_before = server.metric("tandem_serve_batch_size_count") - server.metric(
        "tandem_serve_batch_size_bucket", le="1.0"
    )

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            return await asyncio.gather(
                *(ac.post("/v2/models/affine/infer", json=request([r])) for r in rows)
            )

    together = [outputs(r)["y"][0] for r in asyncio.run(burst())]
    np.testing.assert_allclose(np.stack(together), np.stack(alone), rtol=1e-5, atol=1e-6)
    multi_after = server.metric("tandem_serve_batch_size_count") - server.metric(
        "tandem_serve_batch_size_bucket", le="1.0"
    )
    assert multi_after > multi_before


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b["inputs"][0].update(datatype="INT32"), "inputs[0].datatype"),
        (lambda b: b["inputs"][0].update(datatype="COMPLEX"), "inputs[0].datatype"),
        (lambda b: b["inputs"][0].update(shape=[1, 5]), "inputs[0].shape"),
        (lambda b: b["inputs"][0].update(shape=[]), "inputs[0].shape"),
        (lambda b: b["inputs"][0].update(data=[1, 2, 3]), "inputs[0].data"),
        (lambda b: b["inputs"][0].update(data=["a", "b", "c", "d"]), "inputs[0].data"),
        (lambda b: b["inputs"][0].update(name="z"), "inputs[0].name"),
        (lambda b: b["inputs"].pop(), "inputs"),
        (lambda b: b["inputs"][1].update(shape=[2, 1], data=[1.0, 1.0]), "inputs"),
        (lambda b: b.update(outputs=[{"name": "nope"}]), "outputs[0].name"),
        (lambda b: b["inputs"][0].pop("shape"), "inputs[0].shape"),
        # Parameters this server does not implement are refused by name, never ignored.
        (lambda b: b.update(parameters={"priority": 1}), "parameters.priority"),
        (lambda b: b.update(parameters={"sequence_id": 7}), "parameters.sequence_id"),
        (
            lambda b: b["inputs"][0].update(parameters={"shared_memory_region": "r"}),
            "inputs[0].parameters.shared_memory_region",
        ),
        (
            lambda b: b.update(outputs=[{"name": "y", "parameters": {"classification": 2}}]),
            "outputs[0].parameters.classification",
        ),
        (lambda b: b.update(sequence=1), "sequence"),
    ],
)
def test_bad_requests_are_400_and_name_the_field(client: httpx.Client, mutate: Any, field: str) -> None:
    body = request([[1.0, 2.0, 3.0, 4.0]])
    mutate(body)
    response = client.post("/v2/models/affine/infer", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


def test_tritonclient_with_its_default_binary_data(server: ServerProcess, client: httpx.Client) -> None:
    x = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 2.0, 8.0]], dtype=np.float32)
    scale = np.array([[1.0], [2.0]], dtype=np.float32)
    expected = outputs(client.post("/v2/models/affine/infer", json=request(x.tolist(), [1.0, 2.0])))
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as tc:
        assert tc.is_server_ready()
        assert tc.get_model_metadata("affine")["inputs"] == MODEL_JSON["inputs"]
        inputs = [triton.InferInput("x", [2, 4], "FP32"), triton.InferInput("scale", [2, 1], "FP32")]
        inputs[0].set_data_from_numpy(x)  # binary_data=True: the default
        inputs[1].set_data_from_numpy(scale)
        every = tc.infer("affine", inputs)  # no outputs named: all, as binary data
        np.testing.assert_allclose(every.as_numpy("y"), expected["y"], rtol=1e-6)
        np.testing.assert_allclose(every.as_numpy("total"), expected["total"], rtol=1e-6)
        total = tc.infer("affine", inputs, outputs=[triton.InferRequestedOutput("total")])
        assert total.as_numpy("y") is None
        np.testing.assert_allclose(total.as_numpy("total"), expected["total"], rtol=1e-6)
        as_json = tc.infer("affine", inputs, outputs=[triton.InferRequestedOutput("y", binary_data=False)])
        np.testing.assert_allclose(as_json.as_numpy("y"), expected["y"], rtol=1e-6)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_inputs_are_400(client: httpx.Client, value: float) -> None:
    body = json.dumps(request([[1.0, value, 3.0, 4.0]])).encode()  # json.dumps writes Infinity / NaN
    response = client.post("/v2/models/affine/infer", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("inputs[0].data:")
    raw = np.array([[1.0, value, 3.0, 4.0]], dtype=np.float32).tobytes()
    ones = np.ones((1, 1), dtype=np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
                {"name": "scale", "shape": [1, 1], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
            ]
        }
    ).encode()
    binary = client.post(
        "/v2/models/affine/infer",
        content=head + raw + ones,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert binary.status_code == 400, binary.text
    assert binary.json()["error"].startswith("inputs[0].data:")


@pytest.mark.parametrize(
    ("sizes", "extra", "header", "field"),
    [
        ((16, 4), b"", "9999", "Inference-Header-Content-Length"),
        ((16, 4), b"", "x", "Inference-Header-Content-Length"),
        ((16, 8), b"", None, "inputs[1].parameters.binary_data_size"),
        ((12, 4), b"", None, "inputs[0].parameters.binary_data_size"),
        ((16, 4), b"\0" * 3, None, "body"),
    ],
)
def test_malformed_binary_data_is_400(
    client: httpx.Client, sizes: tuple[int, int], extra: bytes, header: str | None, field: str
) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": sizes[0]},
                },
                {
                    "name": "scale",
                    "shape": [1, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": sizes[1]},
                },
            ]
        }
    ).encode()
    data = np.ones(8, dtype=np.float32).tobytes()[: sizes[0] + sizes[1]] + extra
    response = client.post(
        "/v2/models/affine/infer",
        content=head + data,
        headers={"Inference-Header-Content-Length": header or str(len(head))},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:")


def test_unknown_model_is_404(client: httpx.Client) -> None:
    response = client.post("/v2/models/other/infer", json=request([[1.0, 2.0, 3.0, 4.0]]))
    assert response.status_code == 404


NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.booleans(), st.text(max_size=3)
)
TENSOR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "scale", "other"]),
        "shape": st.lists(st.integers(-1, 5), max_size=3),
        "datatype": st.sampled_from(["FP32", "FP16", "INT64", "BOOL", "BYTES", "x"]),
        "data": st.recursive(st.lists(NUMBERS, max_size=8), lambda c: st.lists(c, max_size=3), max_leaves=10),
    }
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(TENSOR, max_size=3), extra=st.dictionaries(st.text(max_size=5), st.none(), max_size=2))
def test_malformed_tensors_never_break_the_server(
    client: httpx.Client, inputs: list[dict[str, Any]], extra: dict[str, None]
) -> None:
    body = json.dumps({**extra, "inputs": inputs}).encode()  # json.dumps writes Infinity, as clients may
    response = client.post("/v2/models/affine/infer", content=body)
    assert response.status_code in (200, 400), response.text


def test_still_ready_and_no_500s(client: httpx.Client, server: ServerProcess) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    assert server.metric("tandem_serve_request_duration_seconds_count", code="500") == 0


def test_a_tensor_model_exports_no_token_series(client: httpx.Client) -> None:
    """TorchScript has no tokens: no token counters or generation histograms, rather than series at 0."""
    text = client.get("/metrics").text
    assert "tandem_serve_batch_size_count" in text
    for name in ("prompt_tokens", "generated_tokens", "time_to_first_token", "inter_token_latency"):
        assert f"tandem_serve_{name}" not in text
