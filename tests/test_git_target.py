"""The local git target, for real with git in temporary folders: with git-lfs (skipped cleanly where it
is not installed) and without (plain blobs, and the commands that move them into LFS for the Hub)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.errors import ForeignFiles, LocalTargetDirty, LocalTargetNotRepo
from quantkit.publish import PublishOptions, Publisher, SyncResult, git_target, publish_work
from quantkit.publish.git_target import GitTarget, lfs_available
from quantkit.workfolder import SourceRecord, read_settings, write_record
from workfolders import branch_provenance, make_work

REPO = "alice/tiny-exl2"
PLANNED = "These figures are planned"
#: Both storage modes; the LFS one only where git-lfs is installed (.ci/run installs it).
LFS = [pytest.param(False, id="blobs"),
       pytest.param(True, id="lfs", marks=pytest.mark.skipif(not lfs_available(), reason="git-lfs is not installed"))]


def publish(work: Path, target, *, repo: str, force: bool = False) -> list[SyncResult]:
    """The publish stage as `quantkit publish` runs it, on a given target."""
    return publish_work(work, PublishOptions(repo=repo, force=force), target=target).commits


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def files(repo: Path, rev: str) -> list[str]:
    return sorted(git(repo, "ls-tree", "-r", "--name-only", rev).split())


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def files(repo: Path, rev: str) -> list[str]:
    return sorted(git(repo, "ls-tree", "-r", "--name-only", rev).split())


def history(repo: Path, rev: str) -> list[str]:
    return git(repo, "log", "--format=%s", rev).splitlines()


def card(repo: Path, rev: str) -> str:
    return git(repo, "show", f"{rev}:README.md")


def listed(text: str) -> list[str]:
    """The branches of the card's "Available sizes" table."""
    return [line.split(" | ")[0] for line in text.splitlines() if line[:1].isdigit() and " | " in line]


@pytest.mark.parametrize("lfs", LFS)
def test_same_branch_layout_as_the_hub(tmp_path: Path, lfs: bool) -> None:
    work = make_work(tmp_path, branches=("8_0", "6_5", "5_0"))
    repo = tmp_path / "repo"
    publish(work, GitTarget(repo, lfs=lfs), repo=REPO)
    first = git(repo, "rev-list", "--max-parents=0", "main").strip()
    assert git(repo, "log", "-1", "--format=%s", first).strip() == "initial commit"
    assert files(repo, "main") == [".gitattributes", "README.md", "measurement.json", "measurement.provenance.json", "recipe.json"]
    for b in ("8_0", "6_5", "5_0"):
        assert git(repo, "rev-list", "--max-parents=0", b).strip() == first  # cut from the first commit, not main
        assert files(repo, b) == [".gitattributes", "README.md", "config.json", "output.safetensors", "quantkit.json", "tokenizer_config.json"]
        blob = subprocess.run(["git", "-C", str(repo), "show", f"{b}:output.safetensors"], capture_output=True, check=True).stdout
        data = (work / "out" / b / "output.safetensors").read_bytes()
        if lfs:  # a pointer in git, the bytes in git-lfs's store
            import hashlib

            assert blob.decode().startswith("version https://git-lfs.github.com/spec/v1")
            assert f"oid sha256:{hashlib.sha256(data).hexdigest()}" in blob.decode() and f"size {len(data)}" in blob.decode()
        else:
            assert blob == data
    assert (git(repo, "config", "--get", "filter.lfs.process").strip() != "") if lfs else True
    # The checkout shows main, as the Hub's front page does; and a branch clones on its own.
    assert (repo / "measurement.json").read_bytes() == (work / "measurement.json").read_bytes()
    assert git(repo, "status", "--porcelain") == ""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--single-branch", "--branch", "6_5", str(repo), str(clone)], check=True,
                   env={**__import__("os").environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    assert not (clone / "measurement.json").exists() and (clone / "output.safetensors").is_file()


def test_the_card_lists_only_what_is_published_and_follows_each_branch(tmp_path: Path) -> None:
    work = make_work(tmp_path, branches=("8_0", "6_5", "5_0"))
    repo = tmp_path / "repo"
    results = publish(work, GitTarget(repo, lfs=False), repo=REPO)
    # Each branch lands with a card that lists it; then main (after the first branch, never before) and
    # the branches already there get that card: one commit each, none where nothing changed.
    assert [(r.branch, r.committed) for r in results] == [
        ("8_0", True), ("main", True),
        ("6_5", True), ("main", True), ("8_0", True),
        ("5_0", True), ("main", True), ("8_0", True), ("6_5", True)]
    assert history(repo, "main") == ["quantkit: README lists 8_0, 6_5, 5_0", "quantkit: README lists 8_0, 6_5",
                                     "quantkit: measurement.json, README and recipe", "initial commit"]
    assert history(repo, "8_0") == ["quantkit: README lists 8_0, 6_5, 5_0", "quantkit: README lists 8_0, 6_5",
                                    "quantkit: branch 8_0 (8 bpw)", "initial commit"]
    assert history(repo, "5_0") == ["quantkit: branch 5_0 (5 bpw)", "initial commit"]
    assert listed(card(repo, "main~2")) == ["8_0"] and listed(card(repo, "main~1")) == ["8_0", "6_5"]
    final = card(repo, "main")
    assert listed(final) == ["8_0", "6_5", "5_0"]
    for b in ("8_0", "6_5", "5_0"):
        assert card(repo, b) == final and PLANNED not in card(repo, b)
    assert final == (work / "publish" / "README.md").read_text()
    # Real sizes: the table's Size column is the branch's safetensors.
    size = (work / "out" / "6_5" / "output.safetensors").stat().st_size
    row = next(line for line in final.splitlines() if line.startswith("6_5 | "))
    assert row.split(" | ")[3] == f"{size / 1024:.1f} KiB"


@pytest.mark.parametrize("lfs", LFS)
def test_rerun_makes_no_commit_and_a_change_makes_one(tmp_path: Path, lfs: bool) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publish(work, GitTarget(repo, lfs=lfs), repo=REPO)
    heads = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    results = publish(work, GitTarget(repo, lfs=lfs), repo=REPO)
    assert not any(r.committed for r in results)
    assert git(repo, "for-each-ref", "--format=%(refname) %(objectname)") == heads
    write_record(work / "out" / "8_0" / "quantkit.json", branch_provenance("8_0", 8.0, removed=["README.md"]))
    results = publish(work, GitTarget(repo, lfs=lfs), repo=REPO)
    assert [(r.branch, r.uploaded) for r in results if r.committed] == [("8_0", ["quantkit.json"])]


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publisher = Publisher(work, PublishOptions(repo=REPO), target=GitTarget(repo, lfs=False))
    publisher.prepare()
    publisher.land("8_0")  # then the run "died"
    results = publish(work, GitTarget(repo, lfs=False), repo=REPO)
    assert [(r.branch, r.committed) for r in results] == [("8_0", False), ("main", False), ("6_5", True), ("main", True), ("8_0", True)]
    assert listed(card(repo, "8_0")) == ["8_0", "6_5"]


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


@pytest.mark.parametrize("lfs", LFS)
def test_bare_repository(tmp_path: Path, lfs: bool) -> None:
    work = make_work(tmp_path)
    repo = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    publish(work, GitTarget(repo, lfs=lfs), repo=REPO)
    assert files(repo, "6_5")[-1] == "tokenizer_config.json"
    assert not any(r.committed for r in publish(work, GitTarget(repo, lfs=lfs), repo=REPO))


def test_a_non_empty_folder_that_is_not_a_repository_is_refused_before_any_write(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(LocalTargetNotRepo):
        publish(work, GitTarget(folder), repo=REPO)
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]
    r = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO, "--to", str(folder)])
    assert r.exit_code == 1 and "is not empty and not a git repository (it holds cat.jpg)" in r.stderr
    assert "--to" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]
    assert not (work / "state.json").exists()


def test_relative_work_folder_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found end to end: git runs inside the target, so the work folder's files must be passed absolute.
    make_work(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["publish", "work", "--repo", "alice/tiny-exl2", "--to", "pub"])
    assert r.exit_code == 0, r.output
    assert "output.safetensors" in files(tmp_path / "pub", "6_5")


def test_without_git_lfs_the_cli_says_how_to_push(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(git_target, "lfs_available", lambda: False)
    work = make_work(tmp_path)
    repo = tmp_path / "pub"
    r = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO, "--to", str(repo)])
    assert r.exit_code == 0, r.output
    assert "git-lfs is not installed" in r.stderr
    assert f'git -C {repo} lfs migrate import --everything --include="*.safetensors,' in r.stderr
    assert f"git -C {repo} push --force https://huggingface.co/{REPO} --all" in r.stderr


@pytest.mark.parametrize("lfs", LFS)
def test_json_says_what_was_committed_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lfs: bool) -> None:
    monkeypatch.setattr(git_target, "lfs_available", lambda: lfs)
    work = make_work(tmp_path)
    repo = tmp_path / "pub"
    r = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO, "--to", str(repo), "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["target"] == f"git:{repo.resolve()}" and data["path"] == str(repo.resolve()) and data["lfs"] is lfs
    assert data["branches"] == ["main", "8_0", "6_5"]
    commits = [(c["branch"], c["commit"]) for c in data["commits"] if c["committed"]]
    assert commits[-1] == ("8_0", git(repo, "rev-parse", "8_0").strip())
    assert ("6_5", git(repo, "rev-parse", "6_5").strip()) in commits
    assert any("push --force" in line for line in data["push"])
    assert ("lfs migrate" in " ".join(data["push"])) is (not lfs)
    r = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO, "--to", str(repo), "--format", "json"])
    assert not any(c["committed"] for c in json.loads(r.stdout)["commits"])


def test_no_local_path_leaves_the_machine(tmp_path: Path) -> None:
    src = tmp_path / "models" / "my-llama"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"_name_or_path": str(src), "architectures": ["LlamaForCausalLM"]}))
    work = make_work(tmp_path, source=str(src))
    recorded = read_settings(work)
    write_record(work / "recipe.json", recorded.model_copy(update={"source": SourceRecord(path=str(src), hub_id="acme/my-llama")}))
    cfg = json.loads((work / "out" / "6_5" / "config.json").read_text())
    (work / "out" / "6_5" / "config.json").write_text(json.dumps(cfg | {"_name_or_path": str(src)}))
    repo = tmp_path / "pub"
    publish(work, GitTarget(repo, lfs=False), repo=REPO)
    for rev in ("main", "8_0", "6_5"):
        for name in files(repo, rev):
            if name.endswith((".json", ".md")):
                assert str(tmp_path) not in git(repo, "show", f"{rev}:{name}"), f"{rev}:{name}"
    assert json.loads(git(repo, "show", "6_5:config.json"))["_name_or_path"] == "acme/my-llama"
    assert json.loads(git(repo, "show", "main:recipe.json"))["settings"]["model"] == "acme/my-llama"
    # The work folder's own files are untouched; the scrubbed copies are beside the card.
    assert json.loads((work / "out" / "6_5" / "config.json").read_text())["_name_or_path"] == str(src)
