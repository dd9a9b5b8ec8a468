"""The rules file: valid for promtool, every alert firing and not firing, objectives as the chart says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tandem.operator.dashboards import rules
from tandem.operator.dashboards.build import RULES_FILE

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not on PATH: `make system-tools` installs Debian's prometheus package"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def test_promtool_checks_the_rules_file() -> None:
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_and_stays_quiet_when_it_should() -> None:
    result = promtool("test", "rules", "rules-test.yaml", cwd=HERE / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((HERE / "prometheus" / "rules-test.yaml").read_text())
    alerts = {a["alertname"] for case in tested["tests"] for a in case.get("alert_rule_test", ())}
    assert alerts == {rule["alert"] for rule in rules.alert_rules()}  # no alert left untested


def test_the_charts_objectives_are_the_rules_files() -> None:
    values = yaml.safe_load((REPO / "charts/tandem/values.yaml").read_text())
    assert values["prometheusRules"]["objectives"] == rules.OBJECTIVES
    template = (REPO / "charts/tandem/templates/prometheusrule.yaml").read_text()
    for rule in rules.objective_rules(rules.OBJECTIVES):  # the template writes each objective's rule
        assert f'record: "{rule["record"]}"' in template
