"""The local git target, for real with git in temporary folders."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from quantkit.errors import ForeignFiles, LocalTargetDirty
from quantkit.publish import PublishOptions, SyncResult, publish_work
from quantkit.publish.engine import publish_main
from quantkit.publish.git_target import GitTarget
from quantkit.publish.publisher import write_card
from quantkit.workfolder import write_record
from workfolders import branch_provenance, make_work

REPO = "alice/tiny-exl2"


def publish(work: Path, target, *, repo: str, force: bool = False) -> list[SyncResult]:
    """The publish stage as `quantkit publish` runs it, on a given target."""
    return publish_work(work, PublishOptions(repo=repo, force=force), target=target).results


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def files(repo: Path, rev: str) -> list[str]:
    return sorted(git(repo, "ls-tree", "-r", "--name-only", rev).split())


def test_same_branch_layout_as_the_hub(tmp_path: Path) -> None:
    work = make_work(tmp_path, branches=("8_0", "6_5", "5_0"))
    repo = tmp_path / "repo"
    publish(work, GitTarget(repo), repo=REPO)
    first = git(repo, "rev-list", "--max-parents=0", "main").strip()
    assert git(repo, "log", "-1", "--format=%s", first).strip() == "initial commit"
    assert files(repo, "main") == [".gitattributes", "README.md", "measurement.json", "measurement.provenance.json", "recipe.json"]
    for b in ("8_0", "6_5", "5_0"):
        assert git(repo, "rev-parse", f"{b}^").strip() == first  # cut from the first commit, not main
        assert files(repo, b) == [".gitattributes", "README.md", "config.json", "output.safetensors", "quantkit.json", "tokenizer_config.json"]
        blob = subprocess.run(["git", "-C", str(repo), "show", f"{b}:output.safetensors"], capture_output=True, check=True).stdout
        assert blob == (work / "out" / b / "output.safetensors").read_bytes()
    # The checkout shows main, as the Hub's front page does; and a branch clones on its own.
    assert (repo / "measurement.json").read_bytes() == (work / "measurement.json").read_bytes()
    assert git(repo, "status", "--porcelain") == ""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--single-branch", "--branch", "6_5", str(repo), str(clone)], check=True)
    assert not (clone / "measurement.json").exists() and (clone / "output.safetensors").is_file()


def test_rerun_makes_no_commit_and_a_change_makes_one(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publish(work, GitTarget(repo), repo=REPO)
    heads = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    results = publish(work, GitTarget(repo), repo=REPO)
    assert not any(r.committed for r in results)
    assert git(repo, "for-each-ref", "--format=%(refname) %(objectname)") == heads
    write_record(work / "out" / "8_0" / "quantkit.json", branch_provenance("8_0", 8.0, removed=["README.md"]))
    results = publish(work, GitTarget(repo), repo=REPO)
    assert [(r.branch, r.uploaded) for r in results if r.committed] == [("8_0", ["quantkit.json"])]


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    target = GitTarget(repo)
    target.prepare()
    publish_main(work, target, write_card(work, REPO))  # then the run "died"
    results = publish(work, GitTarget(repo), repo=REPO)
    assert [(r.branch, r.committed) for r in results] == [("main", False), ("8_0", True), ("6_5", True)]


def test_foreign_commit_on_a_branch_is_refused_then_forced(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publish(work, GitTarget(repo), repo=REPO)
    git(repo, "checkout", "-q", "6_5")
    (repo / "config.json").write_text("{}")
    git(repo, "add", "config.json")
    git(repo, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-qm", "hand edit")
    git(repo, "checkout", "-q", "main")
    with pytest.raises(ForeignFiles) as info:
        publish(work, GitTarget(repo), repo=REPO)
    assert info.value.files == ["config.json"]
    publish(work, GitTarget(repo), repo=REPO, force=True)
    assert git(repo, "show", "6_5:config.json") == (work / "out" / "6_5" / "config.json").read_text()


def test_dirty_checkout_is_refused(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publish(work, GitTarget(repo), repo=REPO)
    (repo / "README.md").write_text("local edit")
    with pytest.raises(LocalTargetDirty):
        publish(work, GitTarget(repo), repo=REPO)


def test_bare_repository(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    publish(work, GitTarget(repo), repo=REPO)
    assert files(repo, "6_5")[-1] == "tokenizer_config.json"


def test_relative_work_folder_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found end to end: git runs inside the target, so the work folder's files must be passed absolute.
    from click.testing import CliRunner

    from quantkit.cli.main import cli

    make_work(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["publish", "work", "--repo", "alice/tiny-exl2", "--to", "pub"])
    assert r.exit_code == 0, r.output
    assert "output.safetensors" in files(tmp_path / "pub", "6_5")
