"""Component command lines, state layout, process handling and the CLI (no cluster needed)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.devcluster import components, paths, processes, readiness, state
from tandem.errors import UserError

PORTS = dict(zip(state.PORT_NAMES, range(30001, 30001 + len(state.PORT_NAMES)), strict=True))


@pytest.fixture
def cluster_state(tmp_path: Path) -> state.ClusterState:
    return state.ClusterState(name="unit", directory=tmp_path / "unit", ports=dict(PORTS))


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_api_server_is_loopback_only_with_rbac_admission_and_tokens(
    cluster_state: state.ClusterState,
) -> None:
    argv = components.command("kube-apiserver", Path("/bin"), cluster_state)
    flags = _flags(argv)
    assert argv[0] == "/bin/kube-apiserver"
    assert flags["bind-address"] == "127.0.0.1"
    assert flags["secure-port"] == "30003"
    assert flags["authorization-mode"] == "Node,RBAC"
    assert "NodeRestriction" in flags["enable-admission-plugins"]
    assert "admission-control" not in flags  # default plugins stay on
    assert flags["service-account-issuer"].startswith("https://")
    assert flags["service-account-signing-key-file"].endswith("service-account.key")
    assert flags["client-ca-file"].endswith("ca.crt")
    assert flags["etcd-servers"] == "http://127.0.0.1:30001"


def test_every_listener_is_on_loopback(cluster_state: state.ClusterState) -> None:
    for component in state.COMPONENTS:
        flags = _flags(components.command(component, Path("/bin"), cluster_state))
        for key, value in flags.items():
            if key in ("bind-address", "node-ip") or key.startswith("listen-") or key == "server-address":
                assert value.startswith(("127.0.0.1", "http://127.0.0.1")), (component, key, value)


def test_controller_manager_can_sign_service_account_tokens(cluster_state: state.ClusterState) -> None:
    flags = _flags(components.command("kube-controller-manager", Path("/bin"), cluster_state))
    assert flags["service-account-private-key-file"].endswith("service-account.key")
    assert flags["root-ca-file"].endswith("ca.crt")
    assert flags["use-service-account-credentials"] == "true"


def test_kwok_manages_only_annotated_nodes_and_loads_our_stages(cluster_state: state.ClusterState) -> None:
    argv = components.command("kwok", Path("/bin"), cluster_state)
    flags = _flags(argv)
    assert flags["manage-all-nodes"] == "false"
    assert flags["manage-nodes-with-annotation-selector"] == "kwok.x-k8s.io/node=fake"
    configs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    assert [Path(c).name for c in configs] == list(components.KWOK_STAGE_FILES)
    for name in components.KWOK_STAGE_FILES:
        assert (paths.KWOK_CONFIG_DIR / name).is_file()


def test_scheduler_config_uses_its_own_kubeconfig(cluster_state: state.ClusterState) -> None:
    config = components.scheduler_config(cluster_state)
    assert config["clientConnection"]["kubeconfig"].endswith("kube-scheduler.kubeconfig")
    assert config["leaderElection"] == {"leaderElect": False}


def test_state_round_trips_and_lives_under_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert state.load("demo") is None
    saved = state.ClusterState(name="demo", directory=paths.cluster_dir("demo"), ports=dict(PORTS))
    saved.save()
    loaded = state.load("demo")
    assert loaded == saved
    assert loaded.directory == tmp_path / "tandem" / "clusters" / "demo"
    assert loaded.server == "https://127.0.0.1:30003"


@pytest.mark.parametrize("name", ["", "Tandem", "a_b", "-x", "x-", "a" * 41, "../etc"])
def test_bad_cluster_names_are_refused(name: str) -> None:
    with pytest.raises(UserError, match="invalid cluster name"):
        paths.validate_name(name)


def test_picked_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    ports = processes.pick_free_ports(6)
    assert len(set(ports)) == 6
    floor = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(processes.PORT_RANGE_FLOOR <= p < max(floor, processes.PORT_RANGE_FLOOR + 1000) for p in ports)
    assert all(processes.port_is_free(p) for p in ports)


def test_port_in_use_is_detected() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not processes.port_is_free(listener.getsockname()[1])


def test_spawned_process_is_detached_found_again_and_stopped(tmp_path: Path) -> None:
    record = processes.spawn("sleeper", ["/bin/sleep", "60"], tmp_path / "log")
    try:
        assert os.getpgid(record.pid) == record.pid  # its own process group and session
        record.save(tmp_path / "sleeper.json")
        again = processes.ProcessRecord.load(tmp_path / "sleeper.json")
        assert again == record
        assert processes.is_running(record)
        # A different binary under the same pid is not ours: never signalled.
        assert not processes.is_running(processes.ProcessRecord("x", record.pid, ["/bin/other"], ""))
    finally:
        assert processes.stop([record], grace=5) == []
    assert not processes.is_running(record)
    assert not Path(f"/proc/{record.pid}").exists()  # reaped, no zombie


IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True)
time.sleep(60)
"""


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    log = tmp_path / "log"
    record = processes.spawn("stubborn", [sys.executable, "-c", IGNORES_SIGTERM], log)
    deadline = time.monotonic() + 10
    while "up" not in log.read_text():  # the handler must be installed before we signal
        assert processes.is_running(record)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert processes.stop([record], grace=0.3) == []
    assert not processes.is_running(record)


def test_cli_help_and_missing_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["cluster", "up", "--help"])
    assert "--name" in capsys.readouterr().out
    assert main(["cluster", "status", "--name", "nope"]) == 1
    assert main(["cluster", "down", "--name", "nope"]) == 0
    assert main(["cluster", "kubeconfig", "--name", "nope"]) == 1
    assert "tandem cluster up --name nope" in capsys.readouterr().err


def test_waiter_fails_fast_naming_the_log_of_a_component_that_exited(
    cluster_state: state.ClusterState,
) -> None:
    log = cluster_state.log("etcd")
    record = processes.spawn("etcd", ["/bin/sh", "-c", "echo 'bind: address already in use'; exit 1"], log)
    waiter = readiness.Waiter(cluster_state, timeout=30, progress=lambda _m: None)
    waiter.watch(record)
    start = time.monotonic()
    with pytest.raises(
        UserError, match=r"etcd of cluster 'unit' exited during startup(.|\n)*address already in use"
    ):
        waiter.until("never", lambda: "still waiting", "etcd")
    assert time.monotonic() - start < 10


def test_waiter_timeout_says_what_it_waited_for_and_where_to_look(cluster_state: state.ClusterState) -> None:
    waiter = readiness.Waiter(cluster_state, timeout=0.3, progress=lambda _m: None)
    with pytest.raises(UserError, match=r"waiting for nodes \(gpu-node-0 not Ready\).*kwok\.log"):
        waiter.until("nodes", lambda: "gpu-node-0 not Ready", "kwok")
