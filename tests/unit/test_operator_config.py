"""The operator settings object: defaults, config file, env overrides, and the chart's values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tandem.errors import UserError
from tandem.operator.config import OperatorSettings, describe_settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_file_or_env() -> None:
    settings = load_settings({})
    assert settings == OperatorSettings()
    assert settings.gpu_price("NVIDIA-H100-80GB-HBM3") == 4.0
    assert settings.gpu_price("some-new-gpu") == settings.default_gpu_price_usd_per_hour
    assert settings.gpu_price(None) == settings.default_gpu_price_usd_per_hour


def test_config_file_then_env_override(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "namespaces": ["team-a", "team-b"],
                "gpuPricesUsdPerHour": {"NVIDIA-L4": 1.25},
                "metricsPort": 9100,
            }
        )
    )
    settings = load_settings({"TANDEM_CONFIG_FILE": str(config), "TANDEM_METRICS_PORT": "9200"})
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.gpu_price("NVIDIA-L4") == 1.25
    assert settings.metrics_port == 9200  # env wins over the file


def test_env_lists_and_tables() -> None:
    settings = load_settings({"TANDEM_NAMESPACES": "a, b", "TANDEM_GPU_PRICES_USD_PER_HOUR": '{"X": 2}'})
    assert settings.namespaces == ("a", "b")
    assert settings.gpu_price("X") == 2.0


def test_unknown_key_names_the_key_and_lists_known(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("metricPort: 9100\n")
    with pytest.raises(UserError, match=r"unknown setting 'metricPort'.*metricsPort"):
        load_settings({"TANDEM_CONFIG_FILE": str(config)})


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(UserError, match="TANDEM_HEALTH_PORT"):
        load_settings({"TANDEM_HEALTH_PORT": "eighty"})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read operator config"):
        load_settings({"TANDEM_CONFIG_FILE": str(tmp_path / "absent.yaml")})


def test_chart_values_map_one_to_one_onto_settings(tmp_path: Path) -> None:
    """The chart's `config:` values are the settings, key for key, with the same defaults."""
    values = yaml.safe_load((REPO / "charts/tandem/values.yaml").read_text())["config"]
    assert set(values) == {name for name, _, _ in describe_settings()}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))  # what the chart's ConfigMap holds
    assert load_settings({"TANDEM_CONFIG_FILE": str(config)}) == OperatorSettings()


def test_docs_describe_every_setting_with_its_default() -> None:
    """docs/operator.md's table lists every chart value of `config:` with its default."""
    doc = (REPO / "docs/operator.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", doc, re.MULTILINE))
    values = yaml.safe_load((REPO / "charts/tandem/values.yaml").read_text())["config"]
    assert set(rows) == set(values)
    for name, shown in rows.items():
        if shown.strip() != "see values.yaml":
            assert yaml.safe_load(shown.strip().strip("`")) == values[name], name
