"""No crash window: a kill injected at the seams, at every stage boundary and inside every write, leaves
the old file or the new one, and the same command finishes the job.

Kills are injected, never timed: `quantkit.files._commit` (the one rename every atomic write ends in)
raises `Killed` (a BaseException, so no `except Exception` tidies up after it, as none would after
SIGKILL); the local git target is killed between its ref update and its checkout; exllamav2's job file
is truncated as a kill while it rewrites it in place would leave it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from quantkit import files
from quantkit.branches import Branch
from quantkit.exl2 import converter as conv
from quantkit.exl2 import finalize as fin
from quantkit.pipeline import Pipeline, Settings
from quantkit.publish import PublishOptions, publish_work
from quantkit.publish.git_target import GitTarget
from quantkit.run import run_all
from quantkit.workfolder import read_state
from tests_env import converter_env
from workfolders import make_work


REAL_COMMIT = files._commit


class Killed(BaseException):
    """What the process would have died of."""


def pipeline(model: Path, work: Path, listener=None) -> Pipeline:
    s = Settings(model=str(model), rows=2, measurement_rows=2, length=64, branches=[Branch(name="6_5", bits=6.5)])
    p = Pipeline(s, work, listener=listener)
    p.lock()
    return p


def kill_at_commit(monkeypatch: pytest.MonkeyPatch, k: int) -> list[str]:
    """Kill the process just before the k-th atomic write takes effect; returns the names written."""
    seen: list[str] = []

    def commit(tmp: str, path: Path) -> None:
        seen.append(Path(path).name)
        if len(seen) == k:
            if Path(path).name == conv.PID_NAME:  # the converter just started: it dies with quantkit
                os.kill(json.loads(Path(tmp).read_text())["pid"], signal.SIGKILL)
            raise Killed(f"killed writing {path}")
        REAL_COMMIT(tmp, path)

    monkeypatch.setattr(files, "_commit", commit)
    return seen


def outcome(work: Path) -> dict:
    """What a finished job leaves, without the times: step states and the branch's folder and provenance."""
    out = work / "out" / "6_5"
    return {"steps": {k: v.status for k, v in read_state(work).steps.items()},
            "files": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
            "provenance": json.loads((out / "quantkit.json").read_text()),
            "measurement": (work / "measurement.json").read_bytes()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama) -> tuple[dict, int]:
    """A clean run's outcome, and how many atomic writes it made."""
    with converter_env():
        work = tmp_path_factory.mktemp("ref") / "w"
        mp = pytest.MonkeyPatch()
        seen = kill_at_commit(mp, 10**6)
        try:
            run_all(pipeline(tiny_llama, work))
        finally:
            mp.undo()
    return outcome(work), len(seen)


#: Room for a one-branch run's atomic writes (14 today); cases past the run's real count skip.
MAX_WRITES = 20


@pytest.mark.parametrize("k", range(1, MAX_WRITES + 1))
def test_a_kill_inside_any_write_leaves_a_job_that_resumes_to_the_same_result(k, tmp_path, tiny_llama, converter_double, monkeypatch, reference):
    expected, writes = reference
    assert writes <= MAX_WRITES, "the run writes more files than there are cases: raise MAX_WRITES"
    if k > writes:
        pytest.skip(f"the run makes {writes} writes")
    work = tmp_path / "w"
    seen = kill_at_commit(monkeypatch, k)
    with pytest.raises(Killed):
        run_all(pipeline(tiny_llama, work))
    killed_in = seen[-1]
    monkeypatch.setattr(files, "_commit", REAL_COMMIT)
    run_all(pipeline(tiny_llama, work))
    assert outcome(work) == expected, f"killed writing {killed_in}"
    leftovers = [p for p in work.rglob(".*") if p.is_file() and not p.name.startswith(".quantkit.lock")]
    assert all(p.name.startswith(".") for p in leftovers)  # at most temporaries, never a half-written real file


def test_a_truncated_measurement_job_file_redoes_the_measurement(tmp_path, tiny_llama, converter_double, monkeypatch):
    work = tmp_path / "w"
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "measure_quant:3")
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "kill")
    with pytest.raises(Exception):
        pipeline(tiny_llama, work).measure()
    job = work / "measure" / "job_new.json"
    job.write_text(job.read_text()[:40])  # killed while exllamav2 rewrote it in place
    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    said: list[str] = []
    p = pipeline(tiny_llama, work, listener=lambda step, line: said.append(line.text) if line is not None and line.kind == "warning" else None)
    p.measure()
    assert read_state(work).steps["measure"].status == "done"
    assert any("unreadable" in s and "redoing the measurement" in s for s in said)


@pytest.mark.parametrize("damage", ["truncated", "empty", "invalid"])
def test_a_damaged_conversion_job_file_redoes_that_conversion(damage, tmp_path, tiny_llama, converter_double, monkeypatch):
    work = tmp_path / "w"
    pipeline(tiny_llama, work).measure()
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "quant:1")
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "kill")
    with pytest.raises(Exception):
        run_all(pipeline(tiny_llama, work))
    job = work / "jobs" / "6_5" / "job_new.json"
    text = job.read_text()
    job.write_text({"truncated": text[: len(text) // 2], "empty": "",
                    "invalid": json.dumps(json.loads(text) | {"invalid": True})}[damage])
    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    run_all(pipeline(tiny_llama, work))
    assert read_state(work).steps["convert:6_5"].status == "done"
    assert (work / "out" / "6_5" / "quantkit.json").is_file()


def test_a_kill_inside_finalize_leaves_the_same_provenance(tmp_path, tiny_llama, converter_double, monkeypatch, reference):
    expected, _ = reference
    work = tmp_path / "w"
    real = fin.write_index

    def killed(folder):
        raise Killed("after the stale files were removed, before quantkit.json")

    monkeypatch.setattr(fin, "write_index", killed)
    with pytest.raises(Killed):
        run_all(pipeline(tiny_llama, work))
    assert not (work / "out" / "6_5" / "README.md").exists()  # the first pass removed it
    monkeypatch.setattr(fin, "write_index", real)
    run_all(pipeline(tiny_llama, work))
    assert outcome(work)["provenance"] == expected["provenance"]  # removed_from_source_copy included


# ---- the local git target -------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("at", [1, 2])
def test_a_kill_between_the_ref_update_and_the_checkout_is_finished_by_the_rerun(at, tmp_path, monkeypatch):
    """The checkout follows main: at=1 kills after main's first commit, at=2 after main's files."""
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    calls = {"n": 0}
    real = GitTarget._follow

    def follow(self, branch, old, new):
        calls["n"] += 1
        if calls["n"] == at:
            raise Killed("between update-ref and read-tree")
        real(self, branch, old, new)

    monkeypatch.setattr(GitTarget, "_follow", follow)
    with pytest.raises(Killed):
        publish_work(work, PublishOptions(repo="a/b", to=repo))
    monkeypatch.setattr(GitTarget, "_follow", real)
    publish_work(work, PublishOptions(repo="a/b", to=repo))  # not "uncommitted changes"
    assert git(repo, "status", "--porcelain") == ""
    assert sorted(git(repo, "ls-files").split()) == sorted(git(repo, "ls-tree", "-r", "--name-only", "HEAD").split())
    assert {"main", "8_0", "6_5"} <= set(git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/").split())


def test_a_kill_inside_git_leaves_its_lock_files_and_the_rerun_clears_them(tmp_path, monkeypatch):
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    real = GitTarget._follow

    def follow(self, branch, old, new):
        (repo / ".git" / "index.lock").write_text("")  # read-tree died holding the index lock
        raise Killed("inside read-tree")

    monkeypatch.setattr(GitTarget, "_follow", follow)
    with pytest.raises(Killed):
        publish_work(work, PublishOptions(repo="a/b", to=repo))
    monkeypatch.setattr(GitTarget, "_follow", real)
    publish_work(work, PublishOptions(repo="a/b", to=repo))
    assert git(repo, "status", "--porcelain") == "" and not (repo / ".git" / "index.lock").exists()


def test_a_users_own_uncommitted_change_is_still_refused(tmp_path):
    from quantkit.errors import LocalTargetDirty

    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publish_work(work, PublishOptions(repo="a/b", to=repo))
    (repo / "README.md").write_text("my edit")
    with pytest.raises(LocalTargetDirty):
        publish_work(work, PublishOptions(repo="a/b", to=repo))
    assert (repo / "README.md").read_text() == "my edit"


# ---- the card ----------------------------------------------------------------------------------------


def test_a_half_written_card_on_disk_is_never_published(tmp_path):
    work = make_work(tmp_path)
    repo = tmp_path / "repo"
    publish_work(work, PublishOptions(repo="a/b", to=repo))
    good = git(repo, "show", "main:README.md")
    card = work / "publish" / "README.md"
    card.write_text(card.read_text()[:200])  # a kill in the middle of writing it
    from quantkit.publish import BackgroundPublisher

    with BackgroundPublisher(work, PublishOptions(repo="a/b", to=repo)) as pub:  # what `run` does on resume
        pub.begin()
        pub.finish()
    assert git(repo, "show", "main:README.md") == good
    assert card.read_text() == good


def test_a_kill_while_the_card_is_written_leaves_the_old_card(tmp_path, monkeypatch):
    work = make_work(tmp_path)
    from quantkit.publish import PublishOptions, Publisher

    def write_card(repo: str) -> Path:
        return Publisher(work, PublishOptions(repo=repo, to=tmp_path / "repo"), say=print).write_card(["8_0"])

    card = write_card("a/b")
    old = card.read_text()
    seen = kill_at_commit(monkeypatch, 1)
    with pytest.raises(Killed):
        write_card("c/d")
    assert seen == ["README.md"] and card.read_text() == old


# ---- modes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_modes_the_umask_gives(umask, tmp_path):
    old = os.umask(umask)
    try:
        files.write_text_atomic(tmp_path / "a.json", "{}")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


def test_a_whole_run_writes_no_owner_only_file(tmp_path, tiny_llama, converter_double):
    old = os.umask(0o022)
    try:
        work = tmp_path / "w"
        run_all(pipeline(tiny_llama, work))
    finally:
        os.umask(old)
    # jobs/ and measure/ are the converter's scratch (safetensors writes 0600 there); all else is readable
    scratch = (work / "jobs", work / "measure")
    private = [p for p in work.rglob("*") if p.is_file() and stat.S_IMODE(p.stat().st_mode) & 0o044 == 0
               and not any(s in p.parents for s in scratch)]
    assert private == []
    assert stat.S_IMODE((work / "out" / "6_5" / "output.safetensors").stat().st_mode) == 0o644
