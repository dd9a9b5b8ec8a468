"""Training data a user brings: nanoGPT token files, text and JSONL through a tokenizer trained here,
held-out splits, and the vocabulary that sizes the model. Real files, real `tokenizers`, real PyTorch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from tandem.cli import main as tandem_main
from tandem.errors import UserError
from tandem.workloads.data.corpus import builtin_corpus
from tandem.workloads.data.sources import ConcatTokens, Tokens, split_validation
from tandem.workloads.models.tokenizer import EOT_TOKEN, HFTokenizer, pad_vocab
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.cli import with_overrides
from tandem.workloads.train.config import from_spec
from tandem.workloads.train.data import WindowSampler, load_tokens, train_and_validation
from tandem.workloads.train.loop import TOKENIZER_FILE, DistInfo, GPTRun, run_builtin


def spec(dataset: dict[str, Any], **builtin: Any) -> dict[str, Any]:
    return {
        "trainer": {"builtin": {"size": "tiny", "dataset": dataset, "maxSteps": 8, **builtin}},
        "precision": "fp32",
        "batch": {"perDevice": 4},
    }


def gpt2_tokens(path: Path, n: int = 5000, dtype: str = "uint16", top: int = 50256) -> npt.NDArray[Any]:
    """A nanoGPT-style train.bin: headerless ids below GPT-2's 50257, the last id in it."""
    ids: npt.NDArray[Any] = (np.arange(n, dtype=np.int64) * 7919 % top).astype(dtype)
    ids[-1] = top
    ids.tofile(path)
    return ids


def as_array(tokens: Tokens) -> npt.NDArray[Any]:
    """All ids of a data set as one array (shards read through `ConcatTokens` too)."""
    out: npt.NDArray[Any] = tokens[np.arange(len(tokens))]
    return out


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained by `tandem tokenizer train` on the built-in corpus."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert tandem_main(["tokenizer", "train", "tandem://corpus", "-o", str(out), "--vocab-size", "400"]) == 0
    return out


# -- token files --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_nanogpt_token_files_are_read_as_ids_of_the_declared_dtype(tmp_path: Path, dtype: str) -> None:
    written = gpt2_tokens(tmp_path / "train.bin", dtype=dtype)
    cfg = from_spec(
        spec({"uri": f"file://{tmp_path}/train.bin", "tokenDtype": dtype, "vocabSize": 50257}),
        job_name="j",
    )
    tokens = load_tokens(cfg.dataset_uri or "", data_format=cfg.data_format, token_dtype=cfg.token_dtype)
    assert tokens.dtype == np.dtype(dtype)
    assert np.array_equal(as_array(tokens), written)
    # The model's vocabulary is the data's, rounded up to a multiple of 64: GPT-2's 50257 -> 50304.
    assert cfg.vocab_size == 50257
    run = GPTRun(replace(cfg, seq_len=32), DistInfo())
    assert run.model_config.vocab_size == 50304
    assert run.raw_model.wte.weight.shape[0] == 50304


def test_a_directory_of_token_shards_reads_as_one_sequence_without_copying(tmp_path: Path) -> None:
    shards = [gpt2_tokens(tmp_path / f"train-{i}.bin", n=n) for i, n in enumerate((700, 50, 1300))]
    whole = np.concatenate(shards)
    cfg = from_spec(spec({"uri": f"file://{tmp_path}", "vocabSize": 50257}), job_name="j")
    assert cfg.data_format == "auto"  # a directory of only .bin files is token data
    tokens, _ = train_and_validation(cfg, None)
    assert isinstance(tokens, ConcatTokens)
    assert all(isinstance(p, np.memmap) for p in tokens.parts)  # mapped, not read into memory
    assert len(tokens) == len(whole)
    index = np.array([[0, 699, 700, 749], [750, 2049, 5, 720]])  # across both shard boundaries
    assert np.array_equal(tokens[index], whole[index])
    assert np.array_equal(tokens[690:760][np.arange(70)], whole[690:760])
    # The sampler sees exactly the concatenation: same windows, same batches.
    a, b = WindowSampler(tokens, 32, seed=3), WindowSampler(whole, 32, seed=3)
    assert np.array_equal(a.batch(0, 200), b.batch(0, 200))
    train, held_out = split_validation(tokens, 0.25)
    assert np.array_equal(held_out[np.arange(len(held_out))], whole[len(whole) - len(held_out) :])
    assert len(train) + len(held_out) == len(whole)


def test_a_token_file_read_with_the_wrong_dtype_or_vocabulary_fails_naming_the_field(tmp_path: Path) -> None:
    gpt2_tokens(tmp_path / "train.bin", n=5001)  # 10002 bytes: not a whole number of uint32 tokens
    uri = f"file://{tmp_path}/train.bin"
    with pytest.raises(UserError, match=r"spec\.trainer\.builtin\.dataset\.uri: .*tokenDtype"):
        from_spec(spec({"uri": uri, "tokenDtype": "uint32", "vocabSize": 50257}), job_name="j")
    # A vocabulary smaller than the data's ids (the byte tokenizer's, say) would crash a GPU's lookup.
    with pytest.raises(UserError, match=r"holds token id 50256, not below .*vocabSize \(259\)"):
        from_spec(spec({"uri": uri, "vocabSize": 259}), job_name="j")
    with pytest.raises(UserError, match=r"spec\.trainer\.builtin\.dataset\.vocabSize"):
        from_spec(spec({"uri": uri}), job_name="j")


def test_an_id_out_of_range_is_caught_on_the_host_before_the_model_sees_it(tmp_path: Path) -> None:
    """from_spec checks a prefix of the file (16M ids); every batch is checked on the host as well."""
    ids = np.zeros(4000, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    cfg = from_spec(spec({"uri": f"file://{tmp_path}/train.bin", "vocabSize": 50257}), job_name="j")
    ids[-40:] = 60000  # the file changed after the check (or the bad ids lie beyond the checked prefix)
    ids.tofile(tmp_path / "train.bin")
    run = GPTRun(replace(cfg, seq_len=32, per_device_batch=128, global_batch=128), DistInfo())
    with pytest.raises(ValueError, match=r"token id 60000 .*vocabSize \(50257\)"):
        run.train_step()


# -- tokenizers ---------------------------------------------------------------------------------


def test_tandem_tokenizer_train_and_encode_round_trip_text(tmp_path: Path, tokenizer_file: Path) -> None:
    tok = HFTokenizer.from_file(tokenizer_file)
    assert tok.eos_id == 0
    assert 256 < tok.vocab_size <= 400
    text = "the old sailor paints a red fox. Ünïcödé too 🙂"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    corpus = builtin_corpus("corpus-small").decode()
    assert len(tok.encode(corpus)) < len(corpus.encode()) / 2  # merges learnt: fewer tokens than bytes
    (tmp_path / "a.txt").write_text(corpus)
    out = tmp_path / "train.bin"
    assert (
        tandem_main(
            ["tokenizer", "encode", str(tmp_path / "a.txt"), "-t", str(tokenizer_file), "-o", str(out)]
        )
        == 0
    )
    ids = np.fromfile(out, dtype=np.uint16)
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids[:-1].tolist()) == corpus


def test_tokenizer_command_errors_name_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem_main(["tokenizer", "train", str(tmp_path / "none"), "-o", str(tmp_path / "t.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "c.txt").write_text("hello")
    assert (
        tandem_main(["tokenizer", "train", str(tmp_path / "c.txt"), "-o", "t.json", "--vocab-size", "100"])
        == 1
    )
    assert "--vocab-size 100" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    args = ["tokenizer", "encode", str(tmp_path / "c.txt"), "-t", str(tmp_path / "bad.json"), "-o", "x.bin"]
    assert tandem_main(args) == 1
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()


def test_jsonl_documents_are_tokenized_and_separated_by_end_of_text(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    docs = ["the cat sees the dog.", "a tired farmer builds a boat.", "the queen hears the wind."] * 40
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
    )
    cfg = from_spec(
        spec(
            {
                "uri": f"file://{tmp_path}/d.jsonl",
                "tokenizer": f"file://{tokenizer_file}",
                "textField": "body",
            }
        ),
        job_name="j",
    )
    tok = HFTokenizer.from_file(tokenizer_file)
    assert cfg.vocab_size == tok.vocab_size
    tokens, held_out = train_and_validation(cfg, None)
    assert held_out is None
    expected = [i for d in docs for i in [*tok.encode(d), tok.eos_id]]
    assert as_array(tokens).tolist() == expected
    # A line without the field is named with its line number and the field to fix.
    (tmp_path / "d.jsonl").write_text('{"body": "ok"}\n{"text": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: no string under 'body' .*textField"):
        train_and_validation(cfg, None)


def test_a_missing_or_broken_tokenizer_fails_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text " * 100)
    with pytest.raises(UserError, match=r"dataset\.tokenizer: .* not found .*tandem tokenizer train"):
        from_spec(
            spec({"uri": f"file://{tmp_path}/a.txt", "tokenizer": f"file://{tmp_path}/t.json"}), job_name="j"
        )
    (tmp_path / "t.json").write_text("not json")
    with pytest.raises(UserError, match=r"dataset\.tokenizer: .*not a Hugging Face tokenizer\.json"):
        from_spec(
            spec({"uri": f"file://{tmp_path}/a.txt", "tokenizer": f"file://{tmp_path}/t.json"}), job_name="j"
        )


def test_a_bpe_model_trains_on_jsonl_and_its_checkpoint_carries_the_tokenizer(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    text = builtin_corpus("corpus-small").decode().splitlines()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text if t.strip()))
    raw = spec(
        {"uri": f"file://{tmp_path}/d.jsonl", "tokenizer": f"file://{tokenizer_file}"},
        maxSteps=12,
        learningRate=0.003,
        sequenceLength=32,
        optimizer={"warmupSteps": 2},
    )
    raw["checkpoint"] = {"storage": {"uri": f"file://{tmp_path}/ck"}, "everySteps": 12}
    cfg = from_spec(raw, job_name="j", checkpoint_dir=f"file://{tmp_path}/ck")
    result = run_builtin(cfg, DistInfo())
    assert result.history[-1] < result.history[0] - 1.0
    latest = ckpt.list_checkpoints(tmp_path / "ck")[-1]
    meta = ckpt.verify(latest)
    assert (
        meta["tokenizer"]["vocabSize"]
        == meta["vocabSize"]
        == HFTokenizer.from_file(tokenizer_file).vocab_size
    )
    assert meta["model"]["config"]["vocab_size"] == pad_vocab(meta["vocabSize"])
    assert (latest.path / TOKENIZER_FILE).read_bytes() == tokenizer_file.read_bytes()


# -- held-out data ------------------------------------------------------------------------------


def test_a_validation_fraction_holds_out_the_end_and_training_never_sees_it(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    (tmp_path / "a.txt").write_bytes(data)
    cfg = from_spec(spec({"uri": f"file://{tmp_path}/a.txt", "validation": {"fraction": 0.25}}), job_name="j")
    train, held_out = train_and_validation(cfg, None)
    assert held_out is not None
    assert (len(train), len(held_out)) == (7680, 2560)
    assert bytes(as_array(train)) + bytes(as_array(held_out)) == data
    run = GPTRun(replace(cfg, seq_len=32), DistInfo())
    starts = run.sampler.window_starts(0, run.sampler.windows * 2)  # two whole epochs
    assert starts.max() + 33 <= 7680


def test_a_held_out_set_too_small_for_one_sequence_names_the_fraction(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    with pytest.raises(UserError, match=r"validation\.fraction: 0\.1 .* 100 bytes, fewer than one sequence"):
        from_spec(spec({"uri": f"file://{tmp_path}/a.txt", "validation": {"fraction": 0.1}}), job_name="j")


def test_a_separate_validation_file_is_read_like_the_training_data(tmp_path: Path) -> None:
    gpt2_tokens(tmp_path / "train.bin")
    val = gpt2_tokens(tmp_path / "val.bin", n=800)
    dataset = {
        "uri": f"file://{tmp_path}/train.bin",
        "vocabSize": 50257,
        "validation": {"uri": f"file://{tmp_path}/val.bin"},
    }
    cfg = from_spec(spec(dataset), job_name="j")
    _, held_out = train_and_validation(cfg, None)
    assert held_out is not None
    assert np.array_equal(as_array(held_out), val)
    missing = dataset | {"validation": {"uri": f"file://{tmp_path}/nope.bin"}}
    with pytest.raises(UserError, match=r"dataset\.validation\.uri: data set .* not found"):
        from_spec(spec(missing), job_name="j")


# -- local flags map onto the spec ----------------------------------------------------------------


def test_local_seed_and_seq_len_flags_set_the_spec_fields(tmp_path: Path) -> None:
    raw = spec({"uri": "tandem://corpus-small"}, sequenceLength=64)
    raw["seed"] = 3
    assert from_spec(raw, job_name="j").seed == 3
    assert from_spec(with_overrides(raw, seed=None, seq_len=None), job_name="j").seq_len == 64
    cfg = from_spec(with_overrides(raw, seed=11, seq_len=48), job_name="j")
    assert (cfg.seed, cfg.seq_len) == (11, 48)
    assert raw["seed"] == 3  # the file's spec is not changed
    with pytest.raises(UserError, match=r"spec\.trainer\.builtin\.sequenceLength"):
        from_spec(with_overrides(raw, seed=None, seq_len=4), job_name="j")
    entrypoint = {"trainer": {"entrypoint": "a.b:c"}}
    assert from_spec(with_overrides(entrypoint, seed=5, seq_len=None), job_name="j").seed == 5
    with pytest.raises(UserError, match=r"--seq-len sets spec\.trainer\.builtin\.sequenceLength"):
        with_overrides(entrypoint, seed=None, seq_len=64)


def test_the_seed_decides_the_initial_weights(tmp_path: Path) -> None:
    def first_weights(seed: int) -> torch.Tensor:
        raw = spec({"uri": "tandem://corpus-small"}) | {"seed": seed}
        return GPTRun(replace(from_spec(raw, job_name="j"), seq_len=32), DistInfo()).raw_model.wte.weight

    assert torch.equal(first_weights(1), first_weights(1))
    assert not torch.equal(first_weights(1), first_weights(2))


def test_end_of_text_token_is_the_first_special_token(tokenizer_file: Path) -> None:
    tok = HFTokenizer.from_file(tokenizer_file)
    assert tok.encode(EOT_TOKEN) == [0]
    assert tok.decode([0, *tok.encode("hi")]) == "hi"
