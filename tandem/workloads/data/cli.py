"""`tandem tokenizer ...`: make a tokenizer from your own corpus, and pre-tokenize data into token files.

No model hub is reachable from a cluster like this one, so a TrainingJob's tokenizer is trained here:

    tandem tokenizer train corpus/ -o tokenizer.json --vocab-size 8192
    tandem tokenizer encode corpus/ -t tokenizer.json -o train.bin

Nothing heavy (torch, ray) is imported; `tokenizers` only when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tandem.errors import UserError

HELP = """\
Train a byte-level BPE tokenizer (GPT-2's scheme: any UTF-8 text encodes, nothing is unknown) on your
own corpus, and pre-tokenize data into nanoGPT-compatible token files (.bin: headerless uint16/uint32).

  tandem tokenizer train CORPUS... -o tokenizer.json --vocab-size 8192
      Learn merges from text files, directories of them, JSONL files (each line's --text-field) or
      tandem://corpus. The file is a Hugging Face tokenizer.json: put it where the pods read data and
      name it in spec.trainer.builtin.dataset.tokenizer (e.g. pvc://datasets/mine/tokenizer.json).
      <|endoftext|> (id 0) separates documents in the training data.

  tandem tokenizer encode INPUT... -t tokenizer.json -o train.bin
      Tokenize once, here, instead of in every rank at start-up (worth it beyond a few hundred MB of
      text). Prints the spec fields to use with the file (format, tokenDtype, vocabSize).

A TrainingJob can also read text or JSONL directly with the tokenizer; see docs/training.md.
"""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train a BPE tokenizer on a corpus; pre-tokenize data into .bin token files",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="tokenizer_command", metavar="train|encode", required=True)

    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer.json on a corpus",
        description="Train a byte-level BPE tokenizer (a Hugging Face tokenizer.json) on a corpus.",
    )
    train.add_argument(
        "corpus", nargs="+", metavar="CORPUS", help="text/JSONL files, directories, tandem://corpus"
    )
    train.add_argument("-o", "--output", required=True, metavar="FILE", help="the tokenizer.json to write")
    train.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        metavar="N",
        help="tokens in the vocabulary, special tokens and the 256 byte tokens included (default 8192; GPT-2 "
        "has 50257). The model's embedding table is this rounded up to a multiple of 64",
    )
    train.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="merge only pairs seen at least N times (2)"
    )
    train.add_argument(
        "--special-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="another special token (repeatable); <|endoftext|> is always there, as id 0",
    )
    _reading_options(train)
    train.set_defaults(handler=train_command)

    encode = sub.add_parser(
        "encode",
        help="tokenize text/JSONL into a nanoGPT-compatible .bin token file",
        description="Tokenize text or JSONL into a token file (headerless uint16 or uint32 ids, as nanoGPT "
        "writes them), documents separated by <|endoftext|>.",
    )
    encode.add_argument(
        "input", nargs="+", metavar="INPUT", help="text/JSONL files, directories, tandem://corpus"
    )
    encode.add_argument("-t", "--tokenizer", required=True, metavar="FILE", help="a tokenizer.json")
    encode.add_argument("-o", "--output", required=True, metavar="FILE", help="the .bin file to write")
    encode.add_argument(
        "--dtype",
        choices=("auto", "uint16", "uint32"),
        default="auto",
        help="integer type: auto is uint16 when every id fits (vocabularies up to 65,536), else uint32",
    )
    _reading_options(encode)
    encode.set_defaults(handler=encode_command)


def _reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="how inputs are read: auto (by suffix: .jsonl is JSON lines, anything else text), text, jsonl",
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="KEY",
        help="JSONL: the key of each line's text (default text)",
    )


def documents(inputs: list[str], fmt: str, text_field: str) -> Iterator[str]:
    """Every document of the inputs: a text file whole, each JSONL line's `text_field`."""
    from tandem.workloads.data.corpus import CORPORA, builtin_corpus
    from tandem.workloads.data.sources import files_of, jsonl_documents

    for name in inputs:
        if name.startswith("tandem://"):
            key = name.removeprefix("tandem://")
            if key not in CORPORA:
                raise UserError(
                    f"{name}: unknown built-in corpus; known: {', '.join('tandem://' + k for k in CORPORA)}"
                )
            yield builtin_corpus(key).decode()
            continue
        path = Path(name)
        files = files_of(path)
        if not files:
            raise UserError(f"{name}: no such file, or a directory without text or JSONL files")
        for f in files:
            if fmt == "jsonl" or (fmt == "auto" and f.suffix == ".jsonl"):
                try:
                    yield from jsonl_documents(f, text_field)
                except ValueError as exc:
                    raise UserError(f"{exc} (--text-field)") from None
            else:
                yield f.read_text(encoding="utf-8", errors="replace")


def train_command(args: argparse.Namespace) -> int:
    from tandem.workloads.models.tokenizer import EOT_TOKEN, train_bpe

    if args.vocab_size < 257 + len(args.special_token):
        raise UserError(
            f"--vocab-size {args.vocab_size}: a byte-level tokenizer needs the 256 byte tokens and its "
            "special tokens at least; use a few thousand or more"
        )
    if args.min_frequency < 1:
        raise UserError("--min-frequency must be at least 1")
    tokenizer = train_bpe(
        documents(args.corpus, args.format, args.text_field),
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=args.special_token,
    )
    _write_atomically(Path(args.output), tokenizer.to_json().encode())
    print(
        f"wrote {args.output}: byte-level BPE, {tokenizer.vocab_size} tokens "
        f"({EOT_TOKEN} = {tokenizer.eos_id}); name it in spec.trainer.builtin.dataset.tokenizer",
        file=sys.stderr,
    )
    return 0


def encode_command(args: argparse.Namespace) -> int:
    import numpy as np

    from tandem.workloads.data.sources import encode_documents
    from tandem.workloads.models.tokenizer import HFTokenizer

    try:
        tokenizer = HFTokenizer.from_file(args.tokenizer)
    except (ValueError, OSError) as exc:
        raise UserError(f"--tokenizer: {exc}") from None
    ids = encode_documents(list(documents(args.input, args.format, args.text_field)), tokenizer)
    dtype = args.dtype if args.dtype != "auto" else ("uint16" if tokenizer.vocab_size <= 2**16 else "uint32")
    if dtype == "uint16" and tokenizer.vocab_size > 2**16:
        raise UserError(
            f"--dtype uint16 holds ids below 65,536, but the tokenizer has {tokenizer.vocab_size}: use uint32"
        )
    _write_atomically(Path(args.output), np.asarray(ids, dtype=dtype).tobytes())
    print(
        f"wrote {len(ids):,} tokens to {args.output}; in the TrainingJob: dataset.format: tokens, "
        f"tokenDtype: {dtype}, vocabSize: {tokenizer.vocab_size} (or tokenizer: the tokenizer.json)",
        file=sys.stderr,
    )
    return 0


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: never a half-written file."""
    if path.parent and not path.parent.is_dir():
        raise UserError(f"{path}: the directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
