"""The built-in GPT and the byte tokenizer: shapes, sizes, weight tying, loading for inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.workloads.models.gpt import GPT, SIZES, GPTConfig, config_for, load_for_inference
from tandem.workloads.models.tokenizer import BOS, EOS, ByteTokenizer


def test_tokenizer_round_trips_utf8_and_drops_specials() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS
    assert ids[-1] == EOS
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False).startswith("<|bos|>")
    assert tok.padded_vocab_size == 320
    assert tok.padded_vocab_size % 64 == 0


def test_sizes_match_the_documented_shapes() -> None:
    assert 100_000 < GPT(SIZES["tiny"]).num_parameters() < 1_000_000
    c = SIZES["124m"]
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size) == (12, 768, 12, 50304)
    with pytest.raises(KeyError, match="known sizes: tiny, small, medium, 124m"):
        config_for("huge")
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_layer=1, n_head=3, n_embd=64)


def test_forward_loss_and_weight_tying() -> None:
    torch.manual_seed(0)
    model = GPT(config_for("tiny", block_size=32))
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 256, (2, 32))
    logits, loss = model(idx, torch.randint(0, 256, (2, 32)))
    assert logits.shape == (2, 32, 320)
    assert loss is not None
    assert abs(loss.item() - torch.log(torch.tensor(320.0)).item()) < 0.5
    last, none = model(idx)
    assert last.shape == (2, 1, 320)
    assert none is None
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generate_greedy_is_deterministic_and_crops_context() -> None:
    torch.manual_seed(0)
    model = GPT(config_for("tiny", block_size=8)).eval()
    prompt = torch.tensor([ByteTokenizer().encode("hello world")])  # longer than block_size
    a = model.generate(prompt, 5, temperature=0)
    b = model.generate(prompt, 5, temperature=0)
    assert a.shape == (1, prompt.shape[1] + 5)
    assert torch.equal(a, b)


def test_config_round_trips_through_dict() -> None:
    c = config_for("small", block_size=100, dropout=0.1)
    assert GPTConfig.from_dict({**c.to_dict(), "future_field": 1}) == c


def test_load_for_inference_reads_a_training_checkpoint(tmp_path: Path) -> None:
    from tiny_train import train_tiny_checkpoint

    train_tiny_checkpoint(tmp_path, max_steps=2, checkpoint_every_steps=1)
    model, tok, config = load_for_inference(tmp_path)  # the root: newest complete checkpoint
    assert config.block_size == 32
    assert not model.training
    model2, _, _ = load_for_inference("file://" + str(tmp_path / "step-00000002"))
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    out = model.generate(torch.tensor([tok.encode("The ")]), 3, temperature=0)
    assert isinstance(tok.decode(out[0].tolist()), str)
    with pytest.raises(FileNotFoundError):
        load_for_inference(tmp_path / "empty")
