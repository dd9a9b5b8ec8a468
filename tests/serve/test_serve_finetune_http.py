"""A LoRA fine-tune served over real HTTP: a real `tandem serve` process loads the adapter-only checkpoint
of a fine-tuning run (real training loop, CPU), finds its base through the checkpoint's metadata, merges
the adapter and answers with the fine-tuned model's tokens, not the base's; its model metadata names both."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from pretrained import train_tiny_base
from serverprocess import ServerProcess

from tandem.workloads.models.gpt import load_for_inference
from tandem.workloads.models.tokenizer import EOS, ByteTokenizer
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import from_spec
from tandem.workloads.train.loop import DistInfo, GPTRun, run_builtin

PROMPTS = ["3 plus 4 is", "7 times 2 is 1", "The cat"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def claim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint claim with a pretrained base job `base` and its LoRA fine-tune `lora` beside it."""
    claim = tmp_path_factory.mktemp("claim")
    train_tiny_base(claim / "base")
    rng = random.Random(3)
    lines = []
    for _ in range(3000):
        a, b = rng.randrange(10), rng.randrange(10)
        lines.append(f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{a} times {b} is {a * b}.")
    data = claim.parent / "arithmetic.txt"
    data.write_text("\n".join(lines) + "\n")
    spec = {
        "trainer": {
            "builtin": {
                "dataset": {"uri": f"file://{data}"},
                "maxSteps": 20,
                "learningRate": 1e-2,
                "sequenceLength": 32,
                "optimizer": {"warmupSteps": 2},
                "fineTuning": {
                    "base": {"trainingJobRef": {"name": "base"}},
                    "lora": {"rank": 4, "alpha": 8, "targetModules": ["attn.c_attn", "mlp.c_fc"]},
                },
            }
        },
        "batch": {"perDevice": 8},
        "checkpoint": {"storage": {"pvc": "claim"}, "everySteps": 20},
        "precision": "fp32",
    }
    run_builtin(from_spec(spec, job_name="lora", checkpoint_dir=str(claim / "lora")), DistInfo())
    return claim


def greedy(model: torch.nn.Module, prompt: str) -> str:
    """What a greedy server answers: the byte tokenizer's ids only (padding ids never chosen), to EOS."""
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits, _ = model(torch.tensor([ids + out]))
            nxt = int(logits[0, -1, : tok.vocab_size].argmax())
            if nxt == EOS:
                break
            out.append(nxt)
    return tok.decode(out)


@pytest.fixture(scope="module")
def expected(claim: Path) -> dict[str, list[str]]:
    """Greedy answers of the fine-tuned model as training left it (adapter unmerged) and of the base."""
    cfg = from_spec(
        {
            "trainer": {
                "builtin": {
                    "dataset": {"uri": "tandem://corpus-small"},
                    "sequenceLength": 32,
                    "fineTuning": {
                        "base": {"trainingJobRef": {"name": "base"}},
                        "lora": {"rank": 4, "alpha": 8, "targetModules": ["attn.c_attn", "mlp.c_fc"]},
                    },
                }
            },
            "checkpoint": {"storage": {"pvc": "claim"}},
        },
        job_name="lora",
        checkpoint_dir=str(claim / "lora"),
    )
    trained = GPTRun(cfg, DistInfo())
    trained.load(ckpt.CheckpointRef(20, claim / "lora" / "step-00000020"))
    trained.raw_model.eval()
    base, _, _ = load_for_inference(claim / "base")
    return {
        "fine-tuned": [greedy(trained.raw_model, p) for p in PROMPTS],
        "base": [greedy(base, p) for p in PROMPTS],
    }


@pytest.fixture(scope="module")
def server(claim: Path) -> Iterator[ServerProcess]:
    args = [
        "--runtime", "causal-lm", "--model-uri", f"file://{claim / 'lora'}", "--model-name", "tiny-lora",
        "--device", "cpu", "--max-batch-size", "4",
    ]  # fmt: skip
    with ServerProcess(args) as process:
        yield process


def test_the_served_adapter_answers_as_the_fine_tuned_model(
    server: ServerProcess, expected: dict[str, list[str]]
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(
            "/v1/completions",
            json={"model": "tiny-lora", "prompt": PROMPTS, "max_tokens": NEW_TOKENS, "temperature": 0},
        )
    assert response.status_code == 200, response.text
    texts = [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
    assert texts == expected["fine-tuned"]
    assert texts != expected["base"]  # the adapter changed what the model says


def test_the_model_metadata_names_the_base_and_the_adapter(server: ServerProcess, claim: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        meta = client.get("/v2/models/tiny-lora").json()
    assert (
        meta["parameters"].items()
        >= {
            "fine_tuning": "lora",
            "base_checkpoint": ckpt.path_to_uri(claim / "base" / "step-00000030"),
            "base_step": 30,
            "base_training_job": "base",
            "lora_rank": 4,
        }.items()
    )
