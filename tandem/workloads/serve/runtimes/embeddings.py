"""The `embeddings` runtime: a sentence-embedding model (a sentence-transformers directory) -> vectors.

Loads the Transformer with `transformers` from a local directory (no network), pools token states the way
sentence-transformers does (mean over the attention mask by default, or CLS / max as the directory's
`1_Pooling/config.json` says) and L2-normalizes when `modules.json` lists a Normalize module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from tandem.api.serving import Runtime
from tandem.api.serving import ServingPrecision as Precision
from tandem.errors import UserError
from tandem.workloads.serve.model import (
    ModelOptions,
    check_precision,
    quantize_int8,
    torch_device,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

#: Characters of an input kept per token of `max_seq_length` before tokenizing: the tokenizer would read a
#: whole 8 MB input only to truncate it (seconds, on the model's thread, ahead of everyone's batch). Text
#: averages about 4 characters per WordPiece/BPE token; 16 leaves ample room (a run of whitespace longer
#: than that before the words that matter is the only input cut differently).
CHARS_PER_TOKEN = 16
#: Text used to warm up: long enough to exercise a realistic sequence length.
WARM_UP_TEXT = "The quick brown fox jumps over the lazy dog while the model server warms up its kernels. " * 3


@dataclass(frozen=True, slots=True)
class Tokens:
    """One input tokenized ahead of its batch, off the model's thread (`EmbeddingModel.prepare`): its ids,
    already cut to `max_seq_length`."""

    ids: list[int]


@dataclass(frozen=True, slots=True)
class Embedding:
    """One input's vector and how many tokens it used (for the `usage` field)."""

    vector: npt.NDArray[np.float32]
    tokens: int


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot read it ({exc}); is this a sentence-transformers directory?"
        ) from exc


class EmbeddingModel:
    runtime = Runtime.EMBEDDINGS

    def __init__(self, options: ModelOptions) -> None:
        self.name = options.name
        self.options = options
        self.dimensions = 0
        self.max_seq_length = 512
        self.pooling = "mean"
        self.normalize = False
        self._ready = False
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._device: torch.device | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def load(self) -> None:
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        path = self.options.path
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path}: no config.json; the embeddings runtime needs a sentence-transformers or "
                "Hugging Face model directory"
            )
        device = torch_device(self.options.device)
        check_precision(self.options.precision, device)
        self._read_sentence_transformers_config(path)
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        model.eval()
        if self.options.precision is Precision.INT8:
            model = quantize_int8(model)
        else:
            model = model.to(device=device, dtype=torch_dtype(self.options.precision))
        self._model = model
        self._device = device
        self.dimensions = int(model.config.hidden_size)
        torch.set_grad_enabled(False)

    def _read_sentence_transformers_config(self, path: Path) -> None:
        modules = _read_json(path / "modules.json") or []
        pooling_dir = "1_Pooling"
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith("Normalize"):
                self.normalize = True
            if kind.endswith("Pooling"):
                pooling_dir = str(module.get("path", pooling_dir))
        pooling = _read_json(path / pooling_dir / "config.json") or {}
        if pooling.get("pooling_mode_cls_token"):
            self.pooling = "cls"
        elif pooling.get("pooling_mode_max_tokens"):
            self.pooling = "max"
        st_config = _read_json(path / "sentence_bert_config.json") or {}
        self.max_seq_length = int(st_config.get("max_seq_length", self.max_seq_length))

    def warm_up(self, max_batch_size: int) -> None:
        for size in sorted({1, max_batch_size}):
            self.predict([WARM_UP_TEXT] * size)
        self._ready = True

    def clip(self, text: str) -> str:
        """The part of `text` the model can read (its first `max_seq_length` tokens fit in it)."""
        return text[: self.max_seq_length * CHARS_PER_TOKEN]

    def prepare(self, texts: list[str]) -> list[Tokens]:
        """Tokenize `texts` for a later `predict` (the data plane runs this in its own tokenizer thread, one
        at a time: a fast tokenizer must not be used from two threads at once)."""
        if not texts:
            return []
        encoded = self._tokenizer(
            [self.clip(text) for text in texts], truncation=True, max_length=self.max_seq_length
        )
        return [Tokens(list(ids)) for ids in encoded["input_ids"]]

    def count_tokens(self, text: str) -> int:
        ids = self._tokenizer(self.clip(text), truncation=True, max_length=self.max_seq_length)["input_ids"]
        return len(ids)

    def _padded(self, batch: list[Tokens]) -> dict[str, torch.Tensor]:
        """Right-padded ids and their attention mask, as the tokenizer's own padding makes them."""
        import torch

        longest = max(len(t.ids) for t in batch)
        pad = self._tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens.ids)] = torch.tensor(tokens.ids, dtype=torch.long)
            mask[row, : len(tokens.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def predict(self, batch: Sequence[str | Tokens]) -> list[Embedding]:
        """Vectors of a batch of texts, or of inputs `prepare` tokenized already (the server's way)."""
        import torch

        assert self._model is not None, "load() first"
        assert self._device is not None
        # Direct callers (warm-up, benchmarks) pass text: it is tokenized here.
        prepared = iter(self.prepare([item for item in batch if isinstance(item, str)]))
        inputs = [next(prepared) if isinstance(item, str) else item for item in batch]
        encoded = {k: v.to(self._device) for k, v in self._padded(inputs).items()}
        with torch.inference_mode():
            states = self._model(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
            if self.pooling == "cls":
                pooled = states[:, 0]
            elif self.pooling == "max":
                pooled = states.masked_fill(mask == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors = pooled.cpu().numpy().astype(np.float32, copy=False)
            tokens = encoded["attention_mask"].sum(dim=1).tolist()
        return [Embedding(vectors[i], int(tokens[i])) for i in range(len(batch))]

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": "pytorch_transformers",
            "dimensions": self.dimensions,
            "max_seq_length": self.max_seq_length,
            "pooling": self.pooling,
            "normalized": self.normalize,
            "precision": str(self.options.precision),
            "device": str(self._device) if self._device else self.options.device,
        }
