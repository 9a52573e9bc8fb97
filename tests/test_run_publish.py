"""`quantkit run` publishing for real into a local git target: layout, the upload of branch N while
N+1 converts (ordering proved by events from the seams, not by timing), resume after a crash, and an
upload failure that leaves the state saying which branch is unpublished.

The converter double here: these are scheduling and crash tests (a conversion held until an upload
started, a crash between branches); tests/test_real_converter.py publishes exllamav2's real output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from quantkit.exl2.converter import log_path
from quantkit.branches import Branch
from quantkit.cli.main import cli
from quantkit.errors import ConverterFailed, GitFailed, PublishFailed
from quantkit.publish.git_target import GitTarget
from quantkit.pipeline import Pipeline, Settings
from quantkit.run import run_all
from quantkit.tables import format_size
from quantkit.publish import BackgroundPublisher, PublishOptions

REPO = "alice/tiny-exl2"
MAIN = [".gitattributes", "README.md", "measurement.json", "measurement.provenance.json", "recipe.json"]
WAIT = 30  # seconds a handshake may wait before giving up; the ordering assertions decide, not the clock


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def tree(repo: Path, rev: str) -> list[str]:
    return sorted(git(repo, "ls-tree", "-r", "--name-only", rev).split())


def pipeline(model: Path, work: Path, listener=None, bits=(8.0, 5.0)) -> Pipeline:
    s = Settings(model=str(model), rows=2, measurement_rows=2, length=64,
                 branches=[Branch(name=f"{b:g}", bits=b, head_bits=8) for b in bits])
    p = Pipeline(s, work, listener=listener)
    p.lock()
    return p


def stored_sha256(repo: Path, rev: str, name: str) -> str:
    """sha256 of a file as the repository holds it: an LFS pointer's oid (git-lfs installed) or the blob's."""
    blob = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{name}"], capture_output=True, check=True).stdout
    if blob.startswith(b"version https://git-lfs.github.com/spec/v1"):
        return next(line.split(":", 1)[1] for line in blob.decode().splitlines() if line.startswith("oid sha256:"))
    return hashlib.sha256(blob).hexdigest()


def state(work: Path) -> dict:
    return json.loads((work / "state.json").read_text())


def test_a_run_publishes_every_branch_with_the_layout_of_quantkit_publish(tmp_path, tiny_llama, converter_double):
    work, repo = tmp_path / "w", tmp_path / "repo"
    publisher = BackgroundPublisher(work, PublishOptions(repo=REPO, to=repo))
    results = run_all(pipeline(tiny_llama, work), publisher)
    assert [r.branch for r in results] == ["8", "5"]
    first = git(repo, "rev-list", "--max-parents=0", "main").strip()
    assert tree(repo, "main") == MAIN
    assert (repo / "README.md").read_text() == (work / "publish" / "README.md").read_text()
    # The tiny model says who it is in config.json (_name_or_path), as a transformers save does.
    assert "# Exllama v2 quantizations of tiny/llama" in (repo / "README.md").read_text()
    target = publisher.target.id
    assert "These figures are planned" not in (repo / "README.md").read_text()
    for b in ("8", "5"):
        out = work / "out" / b
        assert git(repo, "rev-list", "--max-parents=0", b).strip() == first  # cut from the first commit, not main
        assert git(repo, "show", f"{b}:README.md") == (repo / "README.md").read_text()  # every README is the current card
        assert tree(repo, b) == sorted([".gitattributes", "README.md"] + [p.name for p in out.iterdir()])
        assert stored_sha256(repo, b, "output.safetensors") == hashlib.sha256((out / "output.safetensors").read_bytes()).hexdigest()
        s = state(work)
        assert s["steps"][f"convert:{b}"]["status"] == "done"
        assert s["published"][b][target]["verified"] is True
        assert s["published"][b][target]["commit"] == git(repo, "rev-parse", b).strip()
    assert not any(k.startswith("publish:") for k in state(work)["steps"])  # one record of publishing: "published"


def test_branch_n_uploads_while_branch_n_plus_1_converts(tmp_path, tiny_llama, converter_double):
    events: list[str] = []
    converting_5, uploaded_8 = threading.Event(), threading.Event()
    held: list[bool] = []

    def listener(step, line):  # the pipeline's seam, called on the main thread
        if line is None:
            events.append(f"start {step}")
            if step == "convert:5":
                converting_5.set()
        elif step == "convert:5" and line.status is not None and not held:
            held.append(True)
            uploaded_8.wait(WAIT)  # hold conversion 5 open until upload 8 is done: only an overlap gets past

    def on_event(event, branch):  # the publisher's seam, called on its worker thread
        if event == "upload-start" and branch == "8":
            converting_5.wait(WAIT)  # start uploading 8 only once 5 is converting
        events.append(f"{event} {branch}")
        if event == "upload-done" and branch == "8":
            uploaded_8.set()

    work = tmp_path / "w"
    p = pipeline(tiny_llama, work, listener)
    convert = p.convert

    def recorded_convert(b):
        result = convert(b)
        events.append(f"converted {b.name}")
        return result

    p.convert = recorded_convert  # type: ignore[method-assign]
    run_all(p, BackgroundPublisher(work, PublishOptions(to=tmp_path / "repo"), on_event=on_event))
    at = {e: i for i, e in enumerate(events)}
    assert at["converted 8"] < at["upload-start 8"]
    assert at["start convert:5"] < at["upload-done 8"] < at["converted 5"]  # 8 uploaded during 5's conversion
    assert at["converted 5"] < at["upload-start 5"] < at["upload-done 5"]
    assert not any(t.name.startswith("quantkit-publish") for t in threading.enumerate())  # the worker was joined


def test_a_crash_after_branch_1_published_resumes_without_a_new_commit_for_it(tmp_path, tiny_llama, converter_double, monkeypatch):
    work, repo = tmp_path / "w", tmp_path / "repo"
    uploaded_8 = threading.Event()

    def listener(step, line):
        if step == "convert:5" and line is None:
            uploaded_8.wait(WAIT)
            monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "quant")  # the converter of branch 5 dies, like the OOM killer
            monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "kill")

    def on_event(event, branch):
        if event == "upload-done" and branch == "8":
            uploaded_8.set()

    with pytest.raises(ConverterFailed):
        run_all(pipeline(tiny_llama, work, listener), BackgroundPublisher(work, PublishOptions(repo=REPO, to=repo), on_event=on_event))
    target = GitTarget(repo).id
    assert state(work)["published"]["8"][target]["verified"] is True and "5" not in state(work)["published"]
    heads = {b: git(repo, "rev-parse", b).strip() for b in ("main", "8")}
    commits = git(repo, "rev-list", "--all", "--count").strip()
    assert "5 |" not in (repo / "README.md").read_text()  # main lists only what is there

    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    events: list[str] = []
    run_all(pipeline(tiny_llama, work), BackgroundPublisher(work, PublishOptions(repo=REPO, to=repo), on_event=lambda e, b: events.append(f"{e} {b}")))
    # Three commits: branch 5, then main's and 8's README, which now list 5 too; 8's files are not re-sent.
    assert int(git(repo, "rev-list", "--all", "--count")) == int(commits) + 3
    for b in ("main", "8"):
        assert git(repo, "rev-parse", f"{b}^").strip() == heads[b]
        assert git(repo, "diff", "--name-only", heads[b], b).split() == ["README.md"]
        assert git(repo, "log", "-1", "--format=%s", b).strip() == "quantkit: README lists 8, 5"
    assert tree(repo, "5") == sorted([".gitattributes", "README.md"] + [p.name for p in (work / "out" / "5").iterdir()])
    assert events == ["upload-start 8", "upload-done 8", "upload-start 5", "upload-done 5"]  # 8 checked, found complete
    assert all(state(work)["published"][b][target]["verified"] for b in ("main", "8", "5"))


def recipe(tmp_path: Path, model: Path, publish: str) -> Path:
    top = [] if publish.startswith("[") else [publish]  # a plain key must come before the tables
    text = "\n".join([f'model = "{model}"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64", *top,
                      "[[branches]]", 'name = "8"', "bits = 8.0", "[[branches]]", 'name = "5"', "bits = 5.0",
                      *([publish] if not top else [])])
    (path := tmp_path / "r.toml").write_text(text + "\n")
    return path


def test_an_upload_failure_is_one_line_and_the_state_names_the_unpublished_branch(tmp_path, tiny_llama, converter_double, monkeypatch):
    commit = GitTarget.commit

    def failing(self, branch, adds, deletes, message):
        if branch == "8":
            raise GitFailed(["commit-tree"], "fatal: unable to write new index file")
        return commit(self, branch, adds, deletes, message)

    monkeypatch.setattr(GitTarget, "commit", failing)
    path = recipe(tmp_path, tiny_llama, '[publish]\nto = "repo"')
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output
    assert "branch 8 was converted but not published" in errors[0] and "unable to write new index file" in errors[0]
    s = state(tmp_path / "w")
    target = GitTarget(tmp_path / "repo").id
    assert s["published"]["8"][target]["verified"] is False and "unable to write" in s["published"]["8"][target]["error"]
    assert s["steps"]["convert:5"]["status"] == "done"  # the conversion in flight finished before the error surfaced
    assert "5" not in s["published"]  # and was not uploaded after the failure

    monkeypatch.setattr(GitTarget, "commit", commit)
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 0, r.output
    assert all(state(tmp_path / "w")["published"][b][target]["verified"] for b in ("main", "8", "5"))


def test_a_hub_repo_without_a_token_stops_before_any_work(tmp_path, tiny_llama, converter_double, monkeypatch):
    recipe(tmp_path, tiny_llama, f'[publish]\nrepo = "{REPO}"')
    monkeypatch.chdir(tmp_path)
    path = Path("r.toml")
    r = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "a real run stops before converting: no Hugging Face token" in r.output
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 1
    assert r.stderr == (f"error: no Hugging Face token to publish {REPO}: log in with `hf auth login` (or set HF_TOKEN), "
                        "or publish into a local git repository with --to PATH\n")
    assert not (tmp_path / "w").exists()  # no silent local fallback, and nothing converted for nothing
    r = CliRunner().invoke(cli, ["run", str(path), "--to", "exl2"])  # the flag the message names
    assert r.exit_code == 0, r.output
    assert {"main", "8", "5"} <= set(git(tmp_path / "exl2", "branch", "--format=%(refname:short)").split())


def test_without_a_publish_table_nothing_is_published_and_the_run_says_so(tmp_path, tiny_llama, converter_double):
    path = recipe(tmp_path, tiny_llama, "")
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 0, r.output
    assert "nothing published: add a [publish] table" in r.stderr
    assert not (tmp_path / "w" / "hub-repo").exists() and not state(tmp_path / "w")["published"]


def test_scratch_goes_once_a_branch_is_verified_unless_kept(tmp_path, tiny_llama, converter_double):
    path = recipe(tmp_path, tiny_llama, "")
    r = CliRunner().invoke(cli, ["run", str(path), "--keep-temp"])
    assert r.exit_code == 0, r.output
    job = tmp_path / "w" / "jobs" / "8"
    assert (job / "out_tensor").is_dir()
    r = CliRunner().invoke(cli, ["run", str(path)])  # a rerun finds every step done, and cleans up
    assert r.exit_code == 0, r.output
    for b in ("8", "5"):
        assert sorted(p.name for p in (tmp_path / "w" / "jobs" / b).iterdir()) == ["job_new.json"]
        assert log_path(tmp_path / "w" / "jobs" / b).is_file()
        assert (tmp_path / "w" / "out" / b / "output.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "w" / "measure").iterdir()) == ["job_new.json"]
    r = CliRunner().invoke(cli, ["run", str(path), "--format", "json"])  # and still resumes as done
    assert r.exit_code == 0 and [b["branch"] for b in json.loads(r.stdout)["branches"]] == ["8", "5"]


def test_run_takes_force_as_its_foreign_files_message_says(tmp_path, tiny_llama, converter_double):
    path = recipe(tmp_path, tiny_llama, '[publish]\nto = "repo"')
    assert CliRunner().invoke(cli, ["run", str(path)]).exit_code == 0
    repo = tmp_path / "repo"
    git(repo, "checkout", "-q", "5")
    (repo / "NOTES.md").write_text("mine")
    git(repo, "add", "NOTES.md")
    git(repo, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-qm", "hand edit")
    git(repo, "checkout", "-q", "main")
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 1 and "pass --force to overwrite them" in r.stderr
    r = CliRunner().invoke(cli, ["run", str(path), "--force"])
    assert r.exit_code == 0, r.output
    assert "NOTES.md" not in tree(repo, "5")


def test_run_json_says_what_was_committed_where(tmp_path, tiny_llama, converter_double):
    path = recipe(tmp_path, tiny_llama, '[publish]\nto = "repo"')
    r = CliRunner().invoke(cli, ["run", str(path), "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [b["branch"] for b in data["branches"]] == ["8", "5"]
    pub = data["publish"]
    repo = tmp_path / "repo"
    assert pub["target"] == f"git:{repo.resolve()}" and pub["branches"] == ["main", "8", "5"]
    committed = [(c["branch"], c["commit"]) for c in pub["commits"] if c["committed"]]
    assert [b for b, _ in committed] == ["8", "main", "5", "main", "8"]
    assert committed[-1][1] == git(repo, "rev-parse", "8").strip() and committed[2][1] == git(repo, "rev-parse", "5").strip()


def test_done_when_a_run_to_a_local_git_target_clones_with_a_complete_current_card(tmp_path, tiny_llama, converter_double):
    """The issue's check: `quantkit run` into a local git repository, then `git clone --branch 6_5`."""
    model = tmp_path / "Tiny-Llama-3"
    shutil.copytree(tiny_llama, model)
    (model / "README.md").write_text("---\nlicense: llama3\nlanguage:\n- en\ntags:\n- llama-3\n---\n# Tiny Llama 3\n")
    (tmp_path / "r.toml").write_text("\n".join([
        f'model = "{model}"', 'base_model = "acme/Tiny-Llama-3"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64",
        "[[branches]]", 'name = "8_0"', "bits = 8.0", "[[branches]]", 'name = "6_5"', "bits = 6.5",
        "[publish]", f'repo = "{REPO}"', 'to = "exl2"']) + "\n")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "r.toml")])
    assert r.exit_code == 0, r.output
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", "6_5", str(tmp_path / "exl2"), str(clone)], check=True,
                   env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    text = (clone / "README.md").read_text()
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == "acme/Tiny-Llama-3" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "llama3" and meta["language"] == ["en"] and "llama-3" in meta["tags"]
    assert "These figures are planned" not in text
    sizes = {line.split(" | ")[0]: line.split(" | ")[3] for line in text.splitlines() if line.startswith(("8_0 |", "6_5 |"))}
    for b in ("8_0", "6_5"):
        assert sizes[b] == format_size((tmp_path / "w" / "out" / b / "output.safetensors").stat().st_size)
    assert str(tmp_path) not in text and str(tmp_path) not in (clone / "quantkit.json").read_text()
    assert str(tmp_path) not in git(tmp_path / "exl2", "show", "main:recipe.json")


@pytest.mark.parametrize(
    ("table", "needle"),
    [('[publish]\nrepo = "not a repo"', "not a repo"),
     ('[publish]\nrepository = "a/b"', "unknown key 'repository' in [publish]"),
     ('[publish]\nforce = true', "unknown key 'force' in [publish]"),
     ('base_model = "not/a/model"', "e.g. base_model"),
     ('publish = "a/b"', "publish must be a table")],
)
def test_a_bad_publish_table_is_refused_before_any_work(tmp_path, tiny_llama, converter_double, table, needle):
    r = CliRunner().invoke(cli, ["run", str(recipe(tmp_path, tiny_llama, table))])
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "w" / "calibration").exists()


def test_a_model_named_by_a_relative_path_keeps_its_card_metadata_from_any_folder(tmp_path, tiny_llama, converter_double, monkeypatch):
    # The work folder records the source's absolute path (and Hub id), so a later `card` or `publish`
    # run from elsewhere still finds the source's card: its license is not silently dropped.
    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    (tmp_path / "models" / "tiny" / "README.md").write_text("---\nlicense: llama3\n---\n# tiny\n")
    monkeypatch.chdir(tmp_path / "models")
    r = CliRunner().invoke(cli, ["measure", "tiny", "--work", str(tmp_path / "w"), "--rows", "2", "--length", "64"])
    assert r.exit_code == 0, r.output
    source = json.loads((tmp_path / "w" / "recipe.json").read_text())["source"]
    assert source["path"] == str((tmp_path / "models" / "tiny").resolve()) and source["hub_id"] == "tiny/llama"
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["card", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    meta = ModelCard(r.stdout).data.to_dict()
    assert meta["license"] == "llama3" and meta["base_model"] == "tiny/llama" and meta["base_model_relation"] == "quantized"
