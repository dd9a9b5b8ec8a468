"""The `noop` runtime (benchmarks only): the embeddings protocol with no model behind it.

Every input gets the same zero vector (`dimensions` wide, 384 like all-MiniLM-L6-v2, so replies have a
realistic size) and a token count of its length in bytes. What a load test measures against it is the
server's own cost per request: HTTP, JSON, validation, batching and metrics. No torch import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tandem.api.serving import Runtime
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.embeddings import Embedding

DIMENSIONS = 384


class NoopModel:
    runtime = Runtime.EMBEDDINGS  # it answers `/v1/embeddings`

    def __init__(self, options: ModelOptions, dimensions: int = DIMENSIONS) -> None:
        self.name = options.name
        self.options = options
        self.dimensions = dimensions
        self._vector = np.zeros(dimensions, np.float32)
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def load(self) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> None:
        self._ready = True

    def predict(self, batch: list[str]) -> list[Embedding]:
        return [Embedding(self._vector, len(text)) for text in batch]

    def count_tokens(self, text: str) -> int:
        return len(text)

    def metadata(self) -> dict[str, Any]:
        return {"platform": "noop", "dimensions": self.dimensions}
