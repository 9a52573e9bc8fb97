"""`quantkit run` publishing for real into a local git target: layout, the upload of branch N while
N+1 converts (ordering proved by events from the seams, not by timing), resume after a crash, and an
upload failure that leaves the state saying which branch is unpublished.

The converter double here: these are scheduling and crash tests (a conversion held until an upload
started, a crash between branches); tests/test_real_converter.py publishes exllamav2's real output."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.branches import Branch
from quantkit.cli.main import cli
from quantkit.errors import ConverterFailed, GitFailed, PublishFailed
from quantkit.publish.git_target import GitTarget
from quantkit.pipeline import Pipeline, Settings
from quantkit.run import run_all
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
    assert f"# Exllama v2 quantizations of {tiny_llama.name}" in (repo / "README.md").read_text()
    target = publisher.target.id
    for b in ("8", "5"):
        out = work / "out" / b
        assert git(repo, "rev-parse", f"{b}^").strip() == first  # cut from the first commit, not main
        assert tree(repo, b) == sorted([".gitattributes", "README.md"] + [p.name for p in out.iterdir()])
        blob = subprocess.run(["git", "-C", str(repo), "show", f"{b}:output.safetensors"], capture_output=True, check=True).stdout
        assert blob == (out / "output.safetensors").read_bytes()
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

    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    events: list[str] = []
    run_all(pipeline(tiny_llama, work), BackgroundPublisher(work, PublishOptions(repo=REPO, to=repo), on_event=lambda e, b: events.append(f"{e} {b}")))
    assert {b: git(repo, "rev-parse", b).strip() for b in ("main", "8")} == heads  # no new commit for main or 8
    assert int(git(repo, "rev-list", "--all", "--count")) == int(commits) + 1  # one: branch 5
    assert tree(repo, "5") == sorted([".gitattributes", "README.md"] + [p.name for p in (work / "out" / "5").iterdir()])
    assert events == ["upload-start 8", "upload-done 8", "upload-start 5", "upload-done 5"]  # 8 checked, found complete
    assert all(state(work)["published"][b][target]["verified"] for b in ("main", "8", "5"))


def recipe(tmp_path: Path, model: Path, publish: str) -> Path:
    top = [] if publish.startswith("[") else [publish]  # a plain key must come before the tables
    text = "\n".join([f'model = "{model}"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64",
                      "eval = false", *top,  # the double's outputs are not loadable: tests/test_eval.py evaluates
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


def test_a_hub_repo_without_a_token_publishes_locally_and_says_so(tmp_path, tiny_llama, converter_double, monkeypatch):
    recipe(tmp_path, tiny_llama, f'[publish]\nrepo = "{REPO}"')
    monkeypatch.chdir(tmp_path)
    path = Path("r.toml")  # relative, so WORK is too: git runs elsewhere (-C) and must still find the files
    r = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "publish:main" in r.output and "publish:5" in r.output and "hub-repo" in r.output
    assert not (tmp_path / "w" / "hub-repo").exists()
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code == 0, r.output
    assert "no Hugging Face token configured" in r.output
    local = tmp_path / "w" / "hub-repo"
    assert tree(local, "main") == MAIN and f"quantized_by: {REPO.split('/')[0]}" in (local / "README.md").read_text()
    assert {"8", "5"} <= set(git(local, "branch", "--format=%(refname:short)").split())


@pytest.mark.parametrize(
    ("table", "needle"),
    [('[publish]\nrepo = "not a repo"', "not a repo"),
     ('[publish]\nrepository = "a/b"', "unknown key 'repository' in [publish]"),
     ('publish = "a/b"', "publish must be a table")],
)
def test_a_bad_publish_table_is_refused_before_any_work(tmp_path, tiny_llama, converter_double, table, needle):
    r = CliRunner().invoke(cli, ["run", str(recipe(tmp_path, tiny_llama, table))])
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "w" / "calibration").exists()
