"""Binary cache: what the key covers, Go checks, and that a failed build leaves no cache behind.

The build tests run a fake `go` script, so they take milliseconds and need no toolchain.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tandem.devcluster import build, paths
from tandem.errors import UserError

FILES = {"kubernetes/go.mod": b"module a\n", "kubernetes/go.sum": b"x v1 h1:abc\n"}
FLAGS = {"kubernetes": "-s -w"}
TOOLCHAIN = "go version go1.26.8 linux/amd64 linux amd64 1 v1"


def test_cache_key_is_stable() -> None:
    assert build.cache_key(FILES, FLAGS, TOOLCHAIN) == build.cache_key(dict(FILES), dict(FLAGS), TOOLCHAIN)


@pytest.mark.parametrize(
    ("files", "flags", "toolchain"),
    [
        ({**FILES, "kubernetes/go.sum": b"x v2 h1:def\n"}, FLAGS, TOOLCHAIN),
        ({**FILES, "kubernetes/go.mod": b"module b\n"}, FLAGS, TOOLCHAIN),
        (FILES, {"kubernetes": "-s"}, TOOLCHAIN),
        (FILES, FLAGS, "go version go1.27.0 linux/amd64 linux amd64 1 v1"),
    ],
)
def test_cache_key_changes_with_any_pin(
    files: dict[str, bytes], flags: dict[str, str], toolchain: str
) -> None:
    assert build.cache_key(files, flags, toolchain) != build.cache_key(FILES, FLAGS, TOOLCHAIN)


def test_the_committed_pins_are_read_from_go_mod() -> None:
    gomod = (paths.GOMOD_DIR / "kubernetes" / "go.mod").read_text()
    assert build.module_version(gomod, "k8s.io/kubernetes") == "v1.33.13"
    etcd = (paths.GOMOD_DIR / "etcd" / "go.mod").read_text()
    assert build.module_version(etcd, "go.etcd.io/etcd/server/v3") == "v3.5.21"


def test_required_go_is_the_newest_go_directive() -> None:
    assert build.required_go(["module a\n\ngo 1.24.0\n", "module b\ngo 1.26.0\n", "module c\n"]) == (1, 26)
    assert build.parse_go_version("go version go1.26.8 linux/amd64") == (1, 26)
    assert build.parse_go_version("go version devel go1.27-abcdef linux/amd64") == (1, 27)
    assert build.parse_go_version("bash: go: not found") is None


def test_kubernetes_ldflags_stamp_the_version_for_server_and_kubectl() -> None:
    flags = build.ldflags("kubernetes", "v1.33.13")
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {pkg}.gitVersion=v1.33.13" in flags
        assert f"-X {pkg}.gitMajor=1" in flags
        assert f"-X {pkg}.gitMinor=33" in flags
    assert build.ldflags("etcd", "v1.33.13") == "-s -w"


def test_build_command_never_rewrites_go_mod() -> None:
    command = build.build_command("go", build.BINARIES[0], Path("/out/etcd"), "-s -w")
    assert "-mod=readonly" in command
    assert "-mod=mod" not in command
    assert command[-1] == "go.etcd.io/etcd/server/v3"
    assert command[command.index("-o") + 1] == "/out/etcd"


def _fake_go(folder: Path, *, version: str = "go1.26.8", fail_on: str = "") -> None:
    """A `go` that answers `version`/`env` and "builds" by writing the -o file (or fails on one package)."""
    script = folder / "go"
    script.write_text(
        f"""#!/bin/sh
case "$1" in
  version) echo "go version {version} linux/amd64"; exit 0;;
  env) printf 'linux\\namd64\\n1\\nv1\\n\\n'; exit 0;;
esac
out=""; prev=""
for arg in "$@"; do [ "$prev" = "-o" ] && out="$arg"; prev="$arg"; done
pkg="$arg"
if [ -n "{fail_on}" ] && [ "$pkg" = "{fail_on}" ]; then
  echo "compile error in $pkg: undefined: foo" >&2; exit 2
fi
printf '#!/bin/sh\\necho fake\\n' > "$out"; chmod +x "$out"
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tools = tmp_path / "tools"
    tools.mkdir()
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tools


def test_ensure_binaries_builds_once_then_reuses(fake_env: Path) -> None:
    _fake_go(fake_env)
    messages: list[str] = []
    bin_dir = build.ensure_binaries(messages.append)
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(b.name for b in build.BINARIES)
    assert any("kube-apiserver" in m for m in messages)
    assert bin_dir.parent.parent == paths.builds_root()
    messages.clear()
    assert build.ensure_binaries(messages.append) == bin_dir
    assert messages == []  # cached: nothing built, nothing said


def test_failed_build_explains_and_leaves_no_cache(fake_env: Path) -> None:
    _fake_go(fake_env, fail_on="k8s.io/kubernetes/cmd/kube-scheduler")
    with pytest.raises(UserError) as error:
        build.ensure_binaries()
    message = str(error.value)
    assert "building kube-scheduler failed" in message
    assert "undefined: foo" in message  # the log tail
    assert "go build -mod=readonly" in message
    assert "k8s.io/kubernetes/cmd/kube-scheduler" in message
    assert build.cached_bin_dir() is None
    assert list(paths.builds_root().glob(".tmp-*")) == []


def test_missing_go_says_how_to_install(fake_env: Path) -> None:
    with pytest.raises(UserError, match=r"not on PATH.*go\.dev/dl"):
        build.ensure_binaries()


def test_old_go_is_refused(fake_env: Path) -> None:
    _fake_go(fake_env, version="go1.21.0")
    with pytest.raises(UserError, match=r"go1\.21\.0.*need Go 1\.\d+.*go\.dev/dl"):
        build.ensure_binaries()
