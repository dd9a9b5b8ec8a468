"""`tandem serve` (and the model ceiling) with the embeddings model traced by TorchScript: a benchmark-only
variant, to measure what the eager forward pass's GIL hand-offs cost one process.

Why: eager PyTorch drops and takes back the GIL around every operation (a MiniLM-L6 forward pass has
hundreds), and beside a busy event loop each take-back waits for the loop to let go of the GIL (up to the
switch interval). A traced module runs its whole graph in C++ with the GIL dropped once. If (c) with the
traced model (`bench/serve_load.py` variant `c-jit`) comes much closer to (a) than (c) does, that hand-off
is what bounds one process; the product would then trace (or capture in CUDA graphs) the embeddings model.

    python bench/serve_traced.py --runtime embeddings --model-uri DIR ...   # tandem serve's arguments

The traced graph is checked at load against the eager model on a batch with padding (the masks' code paths
in `transformers` depend on whether a batch is padded: the trace is taken on a padded one, which computes
the same for unpadded batches).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

#: The trace's example: two inputs of different lengths (a padded batch).
EXAMPLE = ["An example sentence.", "A longer example sentence, so that the batch holds padding tokens."]


class TracedEncoder:
    """Stands in for the `transformers` model in `EmbeddingModel.predict` (`model(**encoded)`)."""

    def __init__(self, model: Any, tokenize: Any, device: Any) -> None:
        import torch

        torch._C._jit_set_profiling_executor(False)  # no re-specializing per shape (batches vary)

        class Forward(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return self.inner(input_ids=ids, attention_mask=mask).last_hidden_state  # type: ignore[no-any-return]

        ids, mask = (torch.from_numpy(a).to(device) for a in tokenize(EXAMPLE))
        with torch.inference_mode():
            self.graph = torch.jit.trace(  # type: ignore[no-untyped-call]
                Forward(model), (ids, mask), check_trace=False, strict=False
            )
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = self.graph(ids, mask)
            valid = mask.unsqueeze(-1).bool()
            error = float(((expected - got).abs() * valid).max())
        if error > 1e-3:
            raise RuntimeError(f"the traced model differs from the eager one by {error:g}")

    def __call__(self, *, input_ids: Any, attention_mask: Any) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.graph(input_ids, attention_mask))


def trace_embeddings() -> None:
    """Every `EmbeddingModel` traces its model once loaded (this process and spawned workers)."""
    from tandem.workloads.serve.runtimes.embeddings import EmbeddingModel

    load = EmbeddingModel.load

    def traced_load(self: EmbeddingModel) -> None:
        load(self)
        self._model = TracedEncoder(self._model, self.tokenize, self._device)  # type: ignore[assignment]

    EmbeddingModel.load = traced_load  # type: ignore[method-assign]


if __name__ in ("__main__", "__mp_main__"):  # run, or a spawned worker importing it as its main module
    trace_embeddings()

if __name__ == "__main__":
    from tandem.workloads.serve.cli import main

    sys.exit(main())
