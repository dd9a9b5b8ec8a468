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
class Embedding:
    """One input's vector and how many tokens it used (for the `usage` field)."""

    vector: npt.NDArray[np.float32]
    tokens: int
    finite: bool | None = None
    """Whether every number of `vector` is finite, when the model checked it for its whole batch at once
    (one numpy call per batch, not one per request on the event loop); None: not checked."""


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
        self._encoder: Any = None
        """`tokenizers.Tokenizer` set up for whole batches (`_batch_encoder`); None for a slow tokenizer."""
        self._device: torch.device | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def load(self) -> None:
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
        self._encoder = self._batch_encoder()
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        model.eval()
        if self.options.precision is Precision.INT8:
            model = quantize_int8(model)
        else:
            model = model.to(device=device, dtype=torch_dtype(self.options.precision))
        self._model = model
        self._device = device
        self.dimensions = int(model.config.hidden_size)

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

    def _batch_encoder(self) -> Any:
        """A copy of the fast tokenizer's Rust backend, set once to cut at `max_seq_length` and pad to the
        batch's longest input on the right, as `tokenizer(texts, truncation=True, max_length=...)` and the
        padding before would: one `encode_batch_fast` call (which runs without the GIL) gives the whole
        padded batch. A copy, because the tokenizer's own backend is reconfigured by every `__call__`
        (and the directory's tokenizer.json may set a fixed padding length). None for a slow tokenizer."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(backend.to_str())
        encoder.enable_truncation(self.max_seq_length, stride=0, strategy="longest_first", direction="right")
        pad_id = self._tokenizer.pad_token_id or 0
        pad_token = self._tokenizer.pad_token or "[PAD]"
        encoder.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token)
        return encoder

    def tokenize(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The batch's token ids, right-padded to its longest input, and their attention mask (each input
        cut to `max_seq_length` tokens). Runs in the batch's own thread (`predict`): a batch is tokenized in
        one call, so the event loop hands nothing over per request."""
        clipped = [self.clip(text) for text in texts]
        if self._encoder is not None:
            encodings = self._encoder.encode_batch_fast(clipped)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            return ids, mask
        encoded = self._tokenizer(
            clipped, truncation=True, max_length=self.max_seq_length, padding=True, return_tensors="np"
        )
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def count_tokens(self, text: str) -> int:
        ids = self._tokenizer(self.clip(text), truncation=True, max_length=self.max_seq_length)["input_ids"]
        return len(ids)

    def predict(self, batch: Sequence[str]) -> list[Embedding]:
        """Vectors of a batch of texts (tokenized here, in the batch's thread)."""
        import torch

        assert self._model is not None, "load() first"
        assert self._device is not None
        ids, mask = self.tokenize(batch)
        tokens = mask.sum(axis=1).tolist()
        encoded = {
            "input_ids": torch.from_numpy(ids).to(self._device),
            "attention_mask": torch.from_numpy(mask).to(self._device),
        }
        with torch.inference_mode():
            states = self._model(**encoded).last_hidden_state.float()
            weights = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
            if self.pooling == "cls":
                pooled = states[:, 0]
            elif self.pooling == "max":
                pooled = states.masked_fill(weights == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors = pooled.cpu().numpy().astype(np.float32, copy=False)
        finite = np.isfinite(vectors).all(axis=1).tolist()
        return [Embedding(vectors[i], int(tokens[i]), finite[i]) for i in range(len(batch))]

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
