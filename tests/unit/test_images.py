"""The image build's pure parts: what goes into the build, when a cached archive is reused, and the
Dockerfiles' contract with the chart, the operator's settings and the pods it builds."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem import __version__, cli
from tandem.devcluster import images
from tandem.errors import UserError
from tandem.operator.config import OperatorSettings

REPO = Path(__file__).resolve().parents[2]


def _fake_repo(root: Path) -> Path:
    (root / "tandem" / "sub").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'tandem'\n")
    (root / "README.md").write_text("# Tandem\n")
    (root / "tandem" / "__init__.py").write_text("")
    (root / "tandem" / "sub" / "mod.py").write_text("VALUE = 1\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    return root


def _key(repo: Path, dockerfile: bytes = b"FROM x\n", base_key: str = "b1") -> str:
    files = images.context_files(repo)
    return images.cache_key(dockerfile, images.tree_digest(repo, files), base_key, {"BASE_IMAGE": "base"})


def test_context_is_the_package_sources_and_metadata_without_caches(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    (repo / "tandem" / "__pycache__").mkdir()
    (repo / "tandem" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert [p.as_posix() for p in images.context_files(repo)] == [
        "README.md",
        "pyproject.toml",
        "tandem/__init__.py",
        "tandem/sub/mod.py",
    ]


def test_staged_context_holds_exactly_the_hashed_files(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path / "repo")
    staged = tmp_path / "staged"
    files = images.stage_context(repo, staged)
    assert images.tree_digest(staged, files) == images.tree_digest(repo, images.context_files(repo))
    assert not (staged / "tests").exists()


def test_cache_key_is_stable_for_an_unchanged_tree(tmp_path: Path) -> None:
    repo = _fake_repo(tmp_path)
    first = _key(repo)
    (repo / "tandem" / "sub" / "__pycache__").mkdir()
    (repo / "tandem" / "sub" / "__pycache__" / "mod.pyc").write_bytes(b"compiled")
    (repo / "tests" / "test_y.py").write_text("# outside the image")
    (repo / "docs").mkdir()
    (repo / "docs" / "x.md").write_text("outside the image")
    os.utime(repo / "tandem" / "sub" / "mod.py", (1, 1))  # a touch is not a change
    assert _key(repo) == first


@pytest.mark.parametrize(
    "change",
    ["source edit", "new source file", "pyproject edit", "executable bit", "dockerfile", "base"],
)
def test_cache_key_changes_with_each_input(tmp_path: Path, change: str) -> None:
    repo = _fake_repo(tmp_path)
    before = _key(repo)
    dockerfile, base_key = b"FROM x\n", "b1"
    if change == "source edit":
        (repo / "tandem" / "sub" / "mod.py").write_text("VALUE = 2\n")
    elif change == "new source file":
        (repo / "tandem" / "sub" / "other.py").write_text("")
    elif change == "pyproject edit":
        (repo / "pyproject.toml").write_text("[project]\nname = 'tandem'\nversion = '2'\n")
    elif change == "executable bit":
        (repo / "tandem" / "sub" / "mod.py").chmod(0o755)
    elif change == "dockerfile":
        dockerfile = b"FROM y\n"
    else:
        base_key = "b2"
    assert _key(repo, dockerfile, base_key) != before


def test_a_cached_archive_is_reused_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged tree finds its archive by key and never calls buildah (none is needed)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    repo = _fake_repo(tmp_path / "repo")
    (repo / "images").mkdir()
    (repo / "images" / "operator.Dockerfile").write_text("FROM x\n")
    files = images.context_files(repo)
    base = images.BaseSpec()
    key = images.cache_key(
        b"FROM x\n", images.tree_digest(repo, files), base.key, {"BASE_IMAGE": base.reference}
    )
    archive = images.archive_path(images.OPERATOR, key)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"archive")
    messages: list[str] = []
    result = images.build(images.OPERATOR, messages.append, repo=repo)
    assert (result.archive, result.built) == (archive, False)
    assert "cached" in messages[-1]
    (repo / "tandem" / "sub" / "mod.py").write_text("VALUE = 3\n")
    with pytest.raises(UserError, match="buildah"):  # a changed tree builds, and needs buildah
        images.build(images.OPERATOR, messages.append, repo=repo)


def test_dockerignore_lets_through_exactly_the_staged_context() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is ignored first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == set(images.CONTEXT_PATHS)
    assert {"**/__pycache__", "**/*.pyc"} <= set(lines)


def _contract(spec: images.ImageSpec) -> dict[str, Any]:
    return images.dockerfile_contract((REPO / spec.dockerfile).read_text())


@pytest.mark.parametrize("spec", list(images.IMAGES.values()), ids=list(images.IMAGES))
def test_dockerfiles_run_as_a_numeric_non_root_user(spec: images.ImageSpec) -> None:
    user = _contract(spec)["user"]
    # Numeric, so kubelet can check runAsNonRoot without reading /etc/passwd.
    assert re.fullmatch(r"[0-9]+:[0-9]+", user), user
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0
    assert gid != 0


@pytest.mark.parametrize("spec", list(images.IMAGES.values()), ids=list(images.IMAGES))
def test_dockerfiles_take_the_build_arguments_the_local_build_passes(spec: images.ImageSpec) -> None:
    assert {"BASE_IMAGE", "PIP_CERT"} <= set(_contract(spec)["args"])


def _parses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_operator_image_runs_the_charts_command(capsys: pytest.CaptureFixture[str]) -> None:
    contract = _contract(images.OPERATOR)
    default = contract["entrypoint"] + contract["cmd"]
    deployment = (REPO / "charts" / "tandem" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["tandem", "operator", "run"]' in deployment
    assert default == ["tandem", "operator", "run"]
    assert "usage: tandem operator run" in _parses(default[1:], capsys)


@pytest.mark.parametrize(
    ("argv", "documented"),
    [
        (["train", "head"], "tandem train head"),
        (["train", "worker"], "tandem train worker"),
        (["serve", "--model-uri", "file:///models/m", "--runtime", "noop"], "usage: tandem serve"),
    ],
)
def test_workloads_image_entrypoint_has_the_pod_commands(
    argv: list[str], documented: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pods run `tandem train head|worker` and `tandem serve`: subcommands of the image's entrypoint."""
    assert _contract(images.WORKLOADS)["entrypoint"] == ["tandem"]
    args = cli.build_parser().parse_args(argv)
    assert callable(args.handler)
    assert documented in _parses(argv[:1], capsys)


def test_image_names_are_the_ones_the_settings_and_the_chart_use() -> None:
    settings = OperatorSettings()
    assert settings.training_image == images.WORKLOADS.reference
    assert settings.serving_image == images.WORKLOADS.reference
    values = yaml.safe_load((REPO / "charts" / "tandem" / "values.yaml").read_text())
    chart = yaml.safe_load((REPO / "charts" / "tandem" / "Chart.yaml").read_text())
    assert values["image"]["repository"] == images.OPERATOR.repository
    assert (values["image"]["tag"] or chart["appVersion"]) == __version__
    assert values["config"]["trainingImage"] == values["config"]["servingImage"] == images.WORKLOADS.reference


def test_archive_index_names_the_image_for_containerd_and_for_oci_tools() -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [{"digest": "sha256:ab", "annotations": {"org.opencontainers.image.ref.name": "x"}}],
    }
    named = images.name_index(index, "ghcr.io/tandem-dev/tandem-operator:0.1.0")
    annotations = named["manifests"][0]["annotations"]
    assert annotations["io.containerd.image.name"] == "ghcr.io/tandem-dev/tandem-operator:0.1.0"
    assert annotations["org.opencontainers.image.ref.name"] == "0.1.0"
    assert named["manifests"][0]["digest"] == "sha256:ab"
    with pytest.raises(UserError, match="one image"):
        images.name_index({"manifests": []}, "a/b:1")


def test_references_need_a_tag() -> None:
    assert images.split_reference("localhost:5000/tandem:1.0") == ("localhost:5000/tandem", "1.0")
    with pytest.raises(UserError, match="no tag"):
        images.split_reference("localhost:5000/tandem")


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("[3/3] STEP 7/14: RUN pip wheel ...", True),
        ("STEP 2/3: ARG PIP_CERT", True),
        ("  Downloading torch-2.15.0-cp311-cp311-manylinux_2_28_x86_64.whl (539.1 MB)", True),
        ("  File was already downloaded /var/cache/tandem-wheels/x.whl", False),
        ("Copying blob sha256:274ec51f29a4", False),
        ("--> Using cache 0647949830a5", False),
    ],
)
def test_progress_shows_build_steps_and_downloads(line: str, shown: bool) -> None:
    assert bool(images._SHOWN.search(line)) is shown


def test_output_dir_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["images", "build", "--output-dir", str(not_a_folder)])
    assert exited.value.code == 2
    assert "is not a folder" in capsys.readouterr().err
