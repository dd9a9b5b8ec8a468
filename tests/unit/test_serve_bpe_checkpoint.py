"""A checkpoint trained on a BPE tokenizer's ids is served with that tokenizer (the checkpoint carries
its tokenizer.json): the served answer is the checkpoint's model run greedily with the same tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_train import train_tiny_checkpoint

from tandem.workloads.models.gpt import load_for_inference
from tandem.workloads.models.tokenizer import HFTokenizer, train_bpe
from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.generation import GenerationScheduler, SamplingParams, prompt_ids
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.causal_lm import CausalLM

CORPUS = "the quick brown fox jumps over the lazy dog. " * 200 + "a stitch in time saves nine. " * 200


def bpe_checkpoint(tmp_path: Path) -> tuple[Path, HFTokenizer]:
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    (tmp_path / "corpus.txt").write_text(CORPUS)
    checkpoint = train_tiny_checkpoint(
        tmp_path / "ckpt",
        job_name="bpe",
        dataset_uri=str(tmp_path / "corpus.txt"),
        data_format="text",
        tokenizer_uri=str(tmp_path / "tokenizer.json"),
        vocab_size=tokenizer.vocab_size,
    )
    return checkpoint, tokenizer


@pytest.fixture
def grad_mode_restored() -> Iterator[None]:
    """`CausalLM.load` turns autograd off for its process (a server's): give the next tests theirs back."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


def test_a_bpe_checkpoint_is_served_with_its_own_tokenizer(tmp_path: Path, grad_mode_restored: None) -> None:
    checkpoint, tokenizer = bpe_checkpoint(tmp_path)
    model, loaded, _ = load_for_inference(checkpoint)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("the lazy dog") == tokenizer.encode("the lazy dog")

    served = CausalLM(ModelOptions(name="bpe", path=checkpoint, device="cpu"))
    served.load()
    assert served.token_bytes is None  # decoded over a window of tokens, not byte-wise
    prompt = "the quick brown"
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        expected = tokenizer.decode(model.generate(ids, 8, temperature=0)[0, ids.size(1) :].tolist())

    async def serve() -> str:
        config = BatchingConfig(max_batch_size=2, max_queue_delay_ms=0)
        scheduler = GenerationScheduler(served, config, ServeMetrics("bpe", 2, process_metrics=False))
        scheduler.start()
        handle = scheduler.submit(
            [prompt_ids(served, prompt)], SamplingParams(max_tokens=8, temperature=0), stream=False
        )
        text = ""
        while (event := await handle.next_event()) is not None:
            text += event.text
        await scheduler.close()
        return text

    assert asyncio.run(serve()) == expected
    assert served.prompt_chars >= 32  # a window of BPE tokens spans more characters than tokens
