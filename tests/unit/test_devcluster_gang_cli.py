"""`tandem cluster up --gang-scheduler`: the flag reaches `cluster.up`, the output says how to use it,
and `down` stops a cluster's gang scheduler with the rest (no cluster needed: a stand-in process)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tandem.cli import main
from tandem.devcluster import cluster, gangscheduler, paths, processes


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def _fake_up(calls: list[dict[str, Any]], tmp_path: Path) -> Any:
    def up(name: str, **options: Any) -> cluster.ClusterInfo:
        calls.append({"name": name, **options})
        return cluster.ClusterInfo(
            name=name,
            server="https://127.0.0.1:1",
            kubeconfig=tmp_path / "kubeconfig",
            state_dir=tmp_path / name,
            bin_dir=tmp_path / "bin",
            gang_scheduler=gangscheduler.SCHEDULER_NAME if options["gang_scheduler"] else None,
        )

    return up


def test_up_passes_the_flag_and_says_where_gangs_go(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cluster, "up", _fake_up(calls, cache))
    assert main(["cluster", "up", "--name", "gangs", "--gang-scheduler"]) == 0
    assert calls[-1]["name"] == "gangs"
    out = capsys.readouterr().out
    assert f"# gang scheduler: {gangscheduler.SCHEDULER_NAME}" in out
    assert "TANDEM_GANG_SCHEDULER=coscheduling" in out
    assert out.rstrip().splitlines()[-1].startswith("export KUBECONFIG=")  # eval "$(tandem cluster up)"

    assert main(["cluster", "up", "--name", "plain"]) == 0
    assert [call["gang_scheduler"] for call in calls] == [True, False]
    assert "gang scheduler" not in capsys.readouterr().out


def test_up_help_explains_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["cluster", "up", "--help"])
    out = capsys.readouterr().out
    assert "--gang-scheduler" in out
    assert "TANDEM_GANG_SCHEDULER=coscheduling" in out


def test_down_stops_the_gang_scheduler_and_status_lists_it(cache: Path) -> None:
    """A recorded gang scheduler is part of the cluster: `status` shows it, `down` stops it."""
    directory = paths.cluster_dir("gangs")
    log = directory / "logs" / f"{cluster.GANG_SCHEDULER}.log"
    record = processes.spawn(
        cluster.GANG_SCHEDULER, [sys.executable, "-c", "import time; time.sleep(120)"], log
    )
    try:
        (directory / "run").mkdir(parents=True)
        record.save(directory / "run" / f"{cluster.GANG_SCHEDULER}.json")
        found = {c.name: c for c in cluster.status("gangs").components}
        assert found[cluster.GANG_SCHEDULER].running
        assert found[cluster.GANG_SCHEDULER].pid == record.pid
        assert cluster.down("gangs") is True
        assert not processes.is_running(record)
        assert not directory.exists()
    finally:
        processes.stop([record], grace=1.0)
