"""`tandem serve` argument handling: helpful errors, no heavy imports for --help."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.api.serving import Batching, CudaGraphs, Runtime, ServerOptions
from tandem.api.serving import ServingPrecision as Precision
from tandem.errors import UserError
from tandem.workloads.serve import cli
from tandem.workloads.serve.model import default_model_name


def parse(*argv: str) -> ServerOptions:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub)
    return cli.options_from(parser.parse_args(["serve", *argv]))


def test_help_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from tandem.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['serve', '--help'])\n"
        "assert '--max-queue-delay-ms' in out.getvalue()\n"
        "heavy = {'torch', 'ray', 'kopf', 'uvicorn', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_module_entry_point_shows_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem.workloads.serve", "--help"], capture_output=True, text=True, check=True
    )
    assert "--model-uri" in result.stdout
    assert "/v1/embeddings" in result.stdout


def test_config_from_arguments(tmp_path: Path) -> None:
    model_dir = tmp_path / "minilm" / "model"
    model_dir.mkdir(parents=True)
    args = parse(
        "--runtime", "embeddings", "--model-uri", f"file://{model_dir}", "--max-batch-size", "8",
        "--max-queue-size", "64", "--preferred-batch-sizes", "4,8", "--precision", "int8",
        "--request-timeout-s", "0", "--header-timeout-s", "2.5", "--max-connections", "100",
    )  # fmt: skip
    config = cli.build_config(args)
    assert config.runtime is Runtime.EMBEDDINGS
    assert config.model.name == "minilm"  # `model` is too generic: the parent's name
    assert config.model.path == model_dir
    assert config.model.precision is Precision.INT8
    assert config.batching.preferred_batch_sizes == (4, 8)
    assert config.batching.timeout_s is None
    assert config.port == 8080
    assert (config.limits.header_timeout_s, config.limits.max_connections) == (2.5, 100)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-uri", "/does/not/exist"], "does not exist"),
        (["--model-uri", "pvc://claim/model"], "local files only"),
        (["--model-uri", "http://example.invalid/model"], "unsupported scheme"),
        (["--model-uri", "file://otherhost/x"], "must be local"),
        (["--model-uri", ".", "--max-batch-size", "64", "--max-queue-size", "8"], "--max-queue-size must be"),
        (["--model-uri", ".", "--preferred-batch-sizes", "64"], "--preferred-batch-sizes must each be"),
        (["--model-uri", ".", "--preferred-batch-sizes", "4,x"], "--preferred-batch-sizes: Input should be"),
        (["--model-uri", ".", "--device", "gpu"], "--device: String should match"),
        (["--model-uri", ".", "--model-name", "a/b"], "--model-name"),
        (["--model-uri", ".", "--max-connections", "0"], "--max-connections: Input should be greater"),
        (["--model-uri", ".", "--header-timeout-s", "0"], "--header-timeout-s: Input should be greater"),
    ],
)
def test_user_errors_say_what_to_do(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        cli.build_config(parse("--runtime", "embeddings", *argv))


def test_bad_numbers_name_the_option() -> None:
    with pytest.raises(UserError, match="--max-batch-size: Input should be greater than or equal to 1"):
        parse("--runtime", "embeddings", "--model-uri", ".", "--max-batch-size", "0")
    with pytest.raises(UserError, match="--port: Input should be a valid integer"):
        parse("--runtime", "embeddings", "--model-uri", ".", "--port", "http")


def test_default_model_name(tmp_path: Path) -> None:
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "model.pt").write_bytes(b"")
    assert default_model_name(tmp_path / "resnet") == "resnet"
    assert default_model_name(tmp_path / "resnet" / "model.pt") == "resnet"


def test_kv_cache_switch_is_for_causal_lm(tmp_path: Path) -> None:
    base = ("--runtime", "causal-lm", "--model-uri", str(tmp_path))
    assert cli.build_config(parse(*base)).model.kv_cache is True
    assert cli.build_config(parse(*base, "--kv-cache", "off")).model.kv_cache is False
    with pytest.raises(UserError, match="--kv-cache applies to --runtime causal-lm only"):
        cli.build_config(parse("--runtime", "noop", "--model-uri", ".", "--kv-cache", "off"))


def test_cuda_graphs_switch_is_for_cached_causal_lm(tmp_path: Path) -> None:
    base = ("--runtime", "causal-lm", "--model-uri", str(tmp_path))
    assert cli.build_config(parse(*base)).model.cuda_graphs is CudaGraphs.AUTO
    assert cli.build_config(parse(*base, "--cuda-graphs", "off")).model.cuda_graphs is CudaGraphs.OFF
    with pytest.raises(UserError, match="--cuda-graphs applies to --runtime causal-lm only"):
        parse("--runtime", "embeddings", "--model-uri", ".", "--cuda-graphs", "off")
    with pytest.raises(UserError, match="--cuda-graphs on needs --kv-cache on"):
        parse(*base, "--cuda-graphs", "on", "--kv-cache", "off")


def test_workers_come_from_the_flag_or_the_shared_default() -> None:
    base = ("--runtime", "noop", "--model-uri", ".")
    assert cli.build_config(parse(*base)).workers == Batching().workers
    assert cli.build_config(parse(*base, "--workers", "2")).workers == 2
