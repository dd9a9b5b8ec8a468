"""The causal-lm runtime over real HTTP: a real Tandem training checkpoint (tiny GPT, written by the training
loop) in a real `tandem serve` process; OpenAI completions, SSE streaming read by a real streaming client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverprocess import ServerProcess

from tandem.workloads.models.tokenizer import EOS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tandem.workloads.train.config import TrainConfig
    from tandem.workloads.train.loop import DistInfo, run_builtin

    root = tmp_path_factory.mktemp("gpt")
    config = TrainConfig(
        job_name="serve-test",
        model_size="tiny",
        dataset_uri="tandem://corpus-small",
        max_steps=3,
        seq_len=32,
        per_device_batch=2,
        global_batch=2,
        checkpoint_dir=str(root),
        checkpoint_every_steps=3,
        warmup_steps=1,
    )
    run_builtin(config, DistInfo())
    return root


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[ServerProcess]:
    args = [
        "--runtime", "causal-lm", "--model-uri", f"file://{checkpoint}", "--model-name", "tiny-gpt",
        "--device", "cpu", "--max-batch-size", "8", "--max-queue-delay-ms", "50",
    ]  # fmt: skip
    with ServerProcess(args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_models_and_metadata(client: httpx.Client) -> None:
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-gpt"]
    meta = client.get("/v2/models/tiny-gpt").json()
    assert meta["platform"] == "tandem_gpt"
    assert client.get("/v2/health/ready").status_code == 200


def test_completion_shape_and_usage(client: httpx.Client) -> None:
    answer = complete(client, prompt=["The cat", "Once upon"], max_tokens=12, temperature=0)
    assert answer["object"] == "text_completion"
    assert answer["model"] == "tiny-gpt"
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("length", "stop") for c in answer["choices"])
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(b"The cat") + len(b"Once upon")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 24


def test_concurrent_requests_are_batched_and_answer_as_alone(
    server: ServerProcess, client: httpx.Client
) -> None:
    prompts = [f"Prompt number {i}: the " for i in range(8)]
    alone = [complete(client, prompt=p, max_tokens=16, temperature=0)["choices"][0]["text"] for p in prompts]
    seeded = complete(client, prompt=prompts[0], max_tokens=16, temperature=1.0, seed=7)["choices"][0]["text"]
    multi_before = server.metric("tandem_serve_batch_size_count") - server.metric(
        "tandem_serve_batch_size_bucket", le="1.0"
    )

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            greedy = [
                ac.post("/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0})
                for p in prompts
            ]
            sampled = ac.post(
                "/v1/completions",
                json={"prompt": prompts[0], "max_tokens": 16, "temperature": 1.0, "seed": 7},
            )
            return await asyncio.gather(*greedy, sampled)

    *together, sampled = asyncio.run(burst())
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert sampled.json()["choices"][0]["text"] == seeded  # a seed is per sequence, not per batch
    multi_after = server.metric("tandem_serve_batch_size_count") - server.metric(
        "tandem_serve_batch_size_bucket", le="1.0"
    )
    assert multi_after > multi_before, "no decoding step ran more than one sequence"


def test_stop_strings_cut_the_text(client: httpx.Client) -> None:
    full = complete(client, prompt="The ", max_tokens=24, temperature=0)["choices"][0]
    text = full["text"]
    assert len(text) >= 6
    stop = text[3:5]
    cut = complete(client, prompt="The ", max_tokens=24, temperature=0, stop=[stop, "\u2603"])["choices"][0]
    assert cut["text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_logit_bias_bans_and_forces_tokens(client: httpx.Client) -> None:
    greedy = complete(client, prompt="The ", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert greedy, "greedy decoding gave no text"
    assert greedy[0].isascii(), greedy  # one byte, so one token of the byte tokenizer
    first = ord(greedy[0])
    banned = complete(client, prompt="The ", max_tokens=8, temperature=0, logit_bias={str(first): -100})
    assert banned["choices"][0]["text"][:1] != greedy[0]
    forced = complete(client, prompt="The ", max_tokens=8, temperature=1.0, logit_bias={str(ord("q")): 100})
    assert forced["choices"][0]["text"] == "q" * 8
    assert forced["choices"][0]["finish_reason"] == "length"


def read_sse(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line.removeprefix("data: "))
        else:
            assert line == "", line
    return events


def test_streaming_over_server_sent_events(server: ServerProcess, client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    expected = complete(client, **body)["choices"][0]
    ttft_before = server.metric("tandem_serve_time_to_first_token_seconds_count")
    tokens_before = server.metric("tandem_serve_generated_tokens_total")
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert len(choices) > 1, "the answer came in one piece, not streamed"
    assert "".join(c["text"] for c in choices) == expected["text"]
    assert [c["finish_reason"] for c in choices][-1] == expected["finish_reason"]
    assert all(c["finish_reason"] is None for c in choices[:-1])
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] > 0
    assert server.metric("tandem_serve_time_to_first_token_seconds_count") == ttft_before + 1
    assert server.metric("tandem_serve_generated_tokens_total") >= tokens_before + usage["completion_tokens"]


def test_a_client_that_leaves_mid_stream_stops_its_generation(server: ServerProcess) -> None:
    # EOS banned: sampling from the barely trained model would otherwise end it by chance (about 1 in 259
    # per token) before the disconnect is seen, and nothing would be left to drop.
    endless = {"prompt": "Go on ", "max_tokens": 4000, "stream": True, "logit_bias": {str(EOS): -100}}

    async def leave_early() -> None:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as ac,
            ac.stream("POST", "/v1/completions", json=endless) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first event

    dropped = "tandem_serve_dropped_requests_total"
    before = server.metric("tandem_serve_generated_tokens_total")
    dropped_before = server.metric(dropped, reason="cancelled")
    asyncio.run(leave_early())
    deadline = time.monotonic() + 60
    while server.metric(dropped, reason="cancelled") == dropped_before:  # left the batch at a step boundary
        assert time.monotonic() < deadline, "the abandoned generation was never dropped"
        time.sleep(0.02)
    assert server.metric("tandem_serve_generated_tokens_total") - before < 4000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "9"}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "logit_bias": [257]}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"eos": -100}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"-1": 5}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": "1"}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": True}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"259": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ],
)
def test_validation_errors_are_400_and_name_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_wrong_model_is_404(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-5"})
    assert response.status_code == 404
