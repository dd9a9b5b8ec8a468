"""Token series only where tokens exist: causal-lm's prompt and generated tokens, embeddings' prompt
tokens, none for TorchScript; requests to an embeddings server count the tokens they brought."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tandem.api.serving import Runtime
from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.http import HttpLimits, build_app
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.embeddings import Embedding

TOKEN_SERIES = {
    "tandem_serve_prompt_tokens_total",
    "tandem_serve_generated_tokens_total",
    "tandem_serve_time_to_first_token_seconds_count",
    "tandem_serve_inter_token_latency_seconds_count",
}


def exported(metrics: ServeMetrics) -> set[str]:
    text = metrics.render().decode()
    return {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_each_runtime_exports_the_token_series_it_has() -> None:
    def tokens(runtime: Runtime) -> set[str]:
        return exported(ServeMetrics("m", 4, runtime=runtime.value, process_metrics=False)) & TOKEN_SERIES

    assert tokens(Runtime.CAUSAL_LM) == TOKEN_SERIES
    assert tokens(Runtime.EMBEDDINGS) == {"tandem_serve_prompt_tokens_total"}
    assert tokens(Runtime.NOOP) == {"tandem_serve_prompt_tokens_total"}  # the embeddings protocol
    assert tokens(Runtime.TORCHSCRIPT) == set()
    torchscript = ServeMetrics("m", 4, runtime=Runtime.TORCHSCRIPT.value, process_metrics=False)
    torchscript.tokens(3)  # a stray call records nothing rather than failing
    torchscript.prompt_tokens(3)
    assert exported(torchscript) & TOKEN_SERIES == set()


class WordModel:
    """Embeds a text as its word count, one token per word."""

    runtime = Runtime.EMBEDDINGS

    def __init__(self) -> None:
        self.name = "words"
        self.options = ModelOptions("words", Path("."))
        self.ready = False

    def load(self) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> None:
        self.ready = True

    def predict(self, batch: list[str]) -> list[Embedding]:
        return [Embedding(np.array([len(t.split())], np.float32), tokens=len(t.split())) for t in batch]

    def metadata(self) -> dict[str, Any]:
        return {"platform": "test", "dimensions": 1}


def test_embeddings_requests_count_their_prompt_tokens() -> None:
    model = WordModel()
    metrics = ServeMetrics(model.name, 4, runtime=Runtime.EMBEDDINGS.value, process_metrics=False)
    plane = DataPlane(model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=0), metrics)

    async def main() -> None:
        app = build_app(plane, HttpLimits(), on_load_failed=lambda: None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await plane.load()
            answer = await client.post("/v1/embeddings", json={"input": ["one two", "three"]})
            assert answer.json()["usage"]["prompt_tokens"] == 3
            tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["four five six seven"]}
            infer = await client.post("/v2/models/words/infer", json={"inputs": [tensor]})
            assert infer.status_code == 200, infer.text
            await plane.drain(5)

    asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert 'tandem_serve_prompt_tokens_total{model="words"} 7.0' in metrics.render().decode()
    assert "tandem_serve_generated_tokens_total" not in exported(metrics)
