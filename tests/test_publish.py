"""Publishing to the Hub through the HfApi seam: exact calls, retries, resume, idempotence, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import call

import httpx2
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from fakehub import FakeHub, http_error
from quantkit import hub
from quantkit.cli.main import cli
from quantkit.errors import (
    BranchVerifyFailed,
    ForeignFiles,
    HubRequestFailed,
    InvalidBranchName,
    NoHubToken,
    PrivateStorageExceeded,
    TokenCannotWrite,
    WorkFolderCorrupt,
    WorkFolderIncompatible,
    WorkFolderIncomplete,
)
from quantkit.publish import PublishOptions, SyncResult, publish_work
from quantkit.publish import hub_target as targets
from quantkit.publish.engine import publish_branch
from quantkit.publish.hub_target import HubTarget
from quantkit.workfolder import State, Work, write_record
from workfolders import branch_provenance, make_work

REPO = "alice/tiny-exl2"


def publish(work: Path, target, *, repo: str, force: bool = False) -> list[SyncResult]:
    """The publish stage as `quantkit publish` runs it, on a given target."""
    return publish_work(work, PublishOptions(repo=repo, force=force), target=target).commits


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub_ = FakeHub()
    api = hub_.mock()
    hub_.api = api  # type: ignore[attr-defined]
    monkeypatch.setattr(hub, "get_hf_api", lambda: api)
    monkeypatch.setattr(hub, "validate_card", lambda text: None)
    return hub_


def _target(sleeps: list[float] | None = None, private: bool = False) -> HubTarget:
    return HubTarget(REPO, private=private, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def _ops(c: call) -> list[str]:
    return sorted(op.path_in_repo for op in c.kwargs["operations"])


def test_first_publish_makes_exactly_these_calls(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    results = publish(work, _target(), repo=REPO)
    api = fake.api  # type: ignore[attr-defined]
    api.create_repo.assert_called_once_with(REPO, private=False, exist_ok=True, repo_type="model")
    first = fake.list_repo_commits(REPO)[-1].commit_id
    assert fake.commits[first].title == "initial commit"
    # Each bitrate branch is cut from the repo's FIRST commit, never from main.
    assert api.create_branch.call_args_list == [
        call(REPO, branch="8_0", revision=first, exist_ok=True),
        call(REPO, branch="6_5", revision=first, exist_ok=True),
    ]
    commits = api.create_commit.call_args_list
    # A branch, then main (never before the first branch), then the next branch and the READMEs that
    # must now list it.
    assert [c.kwargs["revision"] for c in commits] == ["8_0", "main", "6_5", "main", "8_0"]
    assert _ops(commits[0]) == ["README.md", "config.json", "output.safetensors", "quantkit.json", "tokenizer_config.json"]
    assert _ops(commits[1]) == ["README.md", "measurement.json", "measurement.provenance.json", "recipe.json"]
    assert _ops(commits[3]) == _ops(commits[4]) == ["README.md"]
    assert all(c.kwargs["commit_message"].startswith("quantkit") for c in commits)
    # The README commit on main carries the card; every branch carries the same card and not main's files.
    card = (work / "publish" / "README.md").read_bytes()
    assert fake.files("main")["README.md"] == card and b"hf download alice/tiny-exl2 --revision 6_5" in card
    for b in ("8_0", "6_5"):
        files = fake.files(b)
        assert sorted(files) == [".gitattributes", "README.md", "config.json", "output.safetensors", "quantkit.json", "tokenizer_config.json"]
        assert files["README.md"] == card
        assert files["output.safetensors"] == (work / "out" / b / "output.safetensors").read_bytes()
    assert fake.history("6_5") == ["quantkit: branch 6_5 (6.5 bpw)", "initial commit"]
    assert fake.history("8_0") == ["quantkit: README lists 8_0, 6_5", "quantkit: branch 8_0 (8 bpw)", "initial commit"]
    assert [(r.branch, r.committed) for r in results] == [("8_0", True), ("main", True), ("6_5", True), ("main", True), ("8_0", True)]
    state = json.loads((work / "state.json").read_text())
    assert set(state["published"]) == {"main", "8_0", "6_5"}
    assert state["published"]["6_5"][f"hub:{REPO}"]["commit"] == fake.branches["6_5"]


def test_second_run_makes_no_commit(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    publish(work, _target(), repo=REPO)
    heads = dict(fake.branches)
    fake.api.reset_mock()  # type: ignore[attr-defined]
    results = publish(work, _target(), repo=REPO)
    assert fake.api.create_commit.call_count == 0 and fake.api.create_branch.call_count == 0  # type: ignore[attr-defined]
    assert fake.branches == heads
    assert not any(r.committed for r in results)


def test_state_json_keeps_other_keys(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    State(Work(work)).mark("convert:8_0", "done", bits=8.0)  # the run's steps, as the pipeline records them
    publish(work, _target(), repo=REPO)
    state = json.loads((work / "state.json").read_text())
    assert state["steps"]["convert:8_0"]["status"] == "done" and state["steps"]["convert:8_0"]["info"]["bits"] == 8.0
    assert "published" in state


def test_state_json_of_another_format_or_schema_is_refused(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    (work / "state.json").write_text(json.dumps({"version": 99, "steps": {}}))
    with pytest.raises(WorkFolderIncompatible) as info:
        publish(work, _target(), repo=REPO)
    assert (info.value.found, info.value.supported) == (99, 1)
    (work / "state.json").write_text(json.dumps({"stage": "converted", "branches": {"8_0": "converted"}}))
    with pytest.raises(WorkFolderCorrupt, match="stage"):
        publish(work, _target(), repo=REPO)


def test_changed_shard_uploads_only_that_file(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    publish(work, _target(), repo=REPO)
    write_record(work / "out" / "6_5" / "quantkit.json", branch_provenance("6_5", 6.5, removed=["README.md"]))
    fake.api.reset_mock()  # type: ignore[attr-defined]
    publish(work, _target(), repo=REPO)
    (only,) = fake.api.create_commit.call_args_list  # type: ignore[attr-defined]
    assert (only.kwargs["revision"], _ops(only)) == ("6_5", ["quantkit.json"])


@pytest.mark.parametrize(("method", "error", "waits"), [
    ("create_commit", http_error(429, {"retry-after": "7"}), [7.0]),  # rate limit: wait as told
    ("create_commit", http_error(500), [2.0]),  # server error: back off
    ("create_commit", httpx2.ConnectError("connection reset by peer"), [2.0]),  # connection lost mid-upload
    ("list_repo_tree", http_error(503), [2.0]),
    ("create_branch", http_error(502), [2.0]),
])
def test_retryable_failures_are_retried(tmp_path: Path, fake: FakeHub, method: str, error: BaseException, waits: list[float]) -> None:
    work = make_work(tmp_path)
    fake.fail[method] = [error]
    sleeps: list[float] = []
    publish(work, _target(sleeps), repo=REPO)
    assert sleeps == waits
    assert sorted(fake.files("6_5")) == sorted(fake.files("8_0"))
    assert len(fake.history("6_5")) == 2  # one commit, not two


def test_backoff_grows_then_gives_up_with_the_reason(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    fake.fail["create_commit"] = [http_error(500, message="Internal Error")] * 6
    sleeps: list[float] = []
    with pytest.raises(HubRequestFailed) as info:
        publish(work, _target(sleeps), repo=REPO)
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert (info.value.status, info.value.attempts, info.value.reason) == (500, 6, "Internal Error")


@pytest.mark.parametrize("status", [400, 403, 404, 413])
def test_other_client_errors_fail_at_once(tmp_path: Path, fake: FakeHub, status: int) -> None:
    work = make_work(tmp_path)
    fake.fail["create_commit"] = [http_error(status, message="You are not allowed")]
    sleeps: list[float] = []
    with pytest.raises(HubRequestFailed) as info:
        publish(work, _target(sleeps), repo=REPO)
    assert sleeps == [] and info.value.status == status and "not allowed" in info.value.reason


def test_interrupted_run_finishes_only_what_is_missing(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path, branches=("8_0", "6_5", "5_0"))
    # main and 8_0 land; then the connection dies for good while 6_5 uploads.
    real = fake.create_commit

    def flaky(*args, **kwargs):
        if kwargs.get("revision") == "6_5":
            raise httpx2.ConnectError("connection lost")
        return real(*args, **kwargs)

    fake.api.create_commit.side_effect = flaky  # type: ignore[attr-defined]
    with pytest.raises(HubRequestFailed):
        publish(work, _target(), repo=REPO)
    state = json.loads((work / "state.json").read_text())
    hub_id = f"hub:{REPO}"
    assert {b for b, r in state["published"].items() if r[hub_id]["verified"]} == {"main", "8_0"}
    assert "connection lost" in state["published"]["6_5"][hub_id]["error"]  # the state says which one failed
    assert b"6_5 |" not in fake.files("main")["README.md"]  # the card never lists a branch that is not there
    fake.api.create_commit.side_effect = None  # type: ignore[attr-defined]
    fake.api.reset_mock()  # type: ignore[attr-defined]
    publish(work, _target(), repo=REPO)
    assert [c.kwargs["revision"] for c in fake.api.create_commit.call_args_list] == [  # type: ignore[attr-defined]
        "6_5", "main", "8_0", "5_0", "main", "8_0", "6_5"]
    published = json.loads((work / "state.json").read_text())["published"]
    assert {b for b, r in published.items() if r[hub_id]["verified"]} == {"main", "8_0", "6_5", "5_0"}
    assert "error" not in published["6_5"][hub_id]


def test_commit_that_landed_before_the_error_is_not_repeated(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    fake.land_then_fail = [http_error(504)]  # the gateway timed out, but 8_0's commit went through
    publish(work, _target(), repo=REPO)
    assert fake.history("8_0") == ["quantkit: README lists 8_0, 6_5", "quantkit: branch 8_0 (8 bpw)", "initial commit"]


def test_commit_that_changed_nothing_is_caught_and_a_rerun_finishes(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    fake.noop_commits = 1  # the server says yes and nothing lands (unsloth #2370's silent case)
    with pytest.raises(BranchVerifyFailed) as info:
        publish(work, _target(), repo=REPO)
    assert info.value.branch == "8_0" and "README.md" in info.value.missing
    publish(work, _target(), repo=REPO)
    assert "measurement.json" in fake.files("main") and "output.safetensors" in fake.files("8_0")


def test_foreign_files_are_refused_and_named_then_forced(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    target = _target()
    target.prepare()
    first = target.first_commit()
    fake.create_branch(REPO, branch="6_5", revision=first)
    notes = tmp_path / "NOTES.md"
    notes.write_text("someone else's notes")
    readme = tmp_path / "README.md"
    readme.write_text("someone else's card")
    from huggingface_hub import CommitOperationAdd

    fake.create_commit(REPO, operations=[CommitOperationAdd("NOTES.md", str(notes)), CommitOperationAdd("README.md", str(readme))],
                       commit_message="Upload folder using huggingface_hub", revision="6_5")
    with pytest.raises(ForeignFiles) as info:
        publish(work, _target(), repo=REPO)
    assert info.value.branch == "6_5" and info.value.files == ["NOTES.md", "README.md"]
    assert b"someone else's card" == fake.files("6_5")["README.md"]
    publish(work, _target(), repo=REPO, force=True)
    assert "NOTES.md" not in fake.files("6_5") and fake.files("6_5")["README.md"] == fake.files("main")["README.md"]


def test_stale_quantkit_files_are_removed_without_force(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    publish(work, _target(), repo=REPO)
    shard = work / "out" / "8_0" / "output.safetensors"
    shard.rename(shard.with_name("output-00001-of-00001.safetensors"))  # a reconversion sharded differently
    publish(work, _target(), repo=REPO)
    assert "output.safetensors" not in fake.files("8_0") and "output-00001-of-00001.safetensors" in fake.files("8_0")


def test_publish_branch_alone_for_the_run_overlap(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path)
    publish(work, _target(), repo=REPO)
    (work / "out" / "4_0").mkdir()
    for f in (work / "out" / "6_5").iterdir():
        (work / "out" / "4_0" / f.name).write_bytes(f.read_bytes())
    target = _target()
    target.prepare()
    result = publish_branch(work, "4_0", target, card=work / "publish" / "README.md")
    assert result.committed and "output.safetensors" in fake.files("4_0")
    assert "4_0" in json.loads((work / "state.json").read_text())["published"]


def test_bad_branch_name_is_refused_before_any_call(tmp_path: Path, fake: FakeHub) -> None:
    work = make_work(tmp_path, branches=("8_0",))
    (work / "out" / "8_0").rename(work / "out" / "8 0")
    with pytest.raises(InvalidBranchName):
        publish(work, _target(), repo=REPO)
    fake.api.create_repo.assert_not_called()  # type: ignore[attr-defined]


@pytest.mark.parametrize("remove", ["measurement.json", "out"])
def test_incomplete_work_folder(tmp_path: Path, fake: FakeHub, remove: str) -> None:
    import shutil

    work = make_work(tmp_path)
    target = work / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WorkFolderIncomplete):
        publish(work, _target(), repo=REPO)


# ---- pre-flight ------------------------------------------------------------------------------------


def _preflight(fake: FakeHub, *, private: bool = False, upload: int = 10, source: str | None = "src/model") -> list[str]:
    return _target(private=private).preflight(upload_bytes=upload, source=source, card_text="---\n---\n")


@pytest.mark.parametrize(("whoami", "expect"), [
    ({"name": "alice", "auth": {"accessToken": {"role": "read"}}}, "read-only"),
    ({"name": "bob", "orgs": [], "auth": {"accessToken": {"role": "write"}}}, "not a member"),
    ({"name": "bob", "orgs": [{"name": "alice", "roleInOrg": "read"}], "auth": {"accessToken": {"role": "write"}}}, "role in alice is read"),
    ({"name": "alice", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read"]}]}}}}, "no repo.write"),
])
def test_preflight_refuses_tokens_that_cannot_write(fake: FakeHub, whoami: dict, expect: str) -> None:
    fake.whoami_answer = whoami
    with pytest.raises(TokenCannotWrite, match=expect):
        _preflight(fake)


def test_preflight_accepts_org_writer_and_reports_gating(fake: FakeHub) -> None:
    fake.whoami_answer = {"name": "bob", "orgs": [{"name": "alice", "roleInOrg": "write"}], "auth": {"accessToken": {"role": "write"}}}
    fake.gated = "manual"
    lines = _preflight(fake)
    assert "token: bob can write to alice" in lines
    assert any("src/model is gated (manual)" in line for line in lines)


def test_preflight_private_storage(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "FREE_PRIVATE_BYTES", 1000)
    with pytest.raises(PrivateStorageExceeded):
        _preflight(fake, private=True, upload=1001)
    assert any("private repo" in line for line in _preflight(fake, private=True, upload=999))


def test_preflight_without_token(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.api.token = None  # type: ignore[attr-defined]
    monkeypatch.setattr(hub, "token", lambda: None)
    with pytest.raises(NoHubToken):
        _preflight(fake)


def test_preflight_invalid_token_is_one_error(fake: FakeHub) -> None:
    fake.fail["whoami"] = [http_error(401, message="Invalid credentials")]
    with pytest.raises(TokenCannotWrite, match="invalid or expired"):
        _preflight(fake)


# ---- the CLI ---------------------------------------------------------------------------------------


def test_cli_publishes_to_the_hub_with_a_token(tmp_path: Path, fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    work = make_work(tmp_path)
    monkeypatch.setattr(hub, "token", lambda: "hf_fake")
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id: None)
    result = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO])
    assert result.exit_code == 0, result.output
    assert "token: alice can write to alice" in result.stderr
    assert f"hub:{REPO}: main, 8_0, 6_5 verified, 5 commits made" in result.stderr
    assert fake.api.create_commit.call_count == 5  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO, "--format", "json"])
    data = json.loads(result.stdout)
    assert data["target"] == f"hub:{REPO}" and data["url"] == f"https://huggingface.co/{REPO}" and data["path"] is None
    assert data["branches"] == ["main", "8_0", "6_5"] and not any(c["committed"] for c in data["commits"])


def test_cli_without_a_token_fails_and_writes_nothing(tmp_path: Path, fake: FakeHub) -> None:
    # No silent local fallback: the exit status says nothing was published.
    work = make_work(tmp_path)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    result = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO])
    assert result.exit_code == 1
    assert result.stderr == (f"error: no Hugging Face token to publish {REPO}: log in with `hf auth login` (or set HF_TOKEN), "
                             "or publish into a local git repository with --to PATH\n")
    assert sorted(p.relative_to(work) for p in work.rglob("*") if not p.name.startswith(".quantkit.lock")) == before
    fake.api.create_repo.assert_not_called()  # type: ignore[attr-defined]


def test_hub_publish_without_base_model_stops_unless_told(tmp_path: Path, fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "token", lambda: "hf_fake")
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id: None)
    src = tmp_path / "my-finetune"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    work = make_work(tmp_path, source=str(src))
    result = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "not a Hub id, so the card would have no base_model" in result.stderr and "--base-model USER/NAME" in result.stderr
    fake.api.create_repo.assert_not_called()  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["publish", str(work), "--repo", REPO, "--base-model", "acme/Llama-3-8B"])
    assert result.exit_code == 0, result.output
    meta = ModelCard(fake.files("6_5")["README.md"].decode()).data.to_dict()
    assert meta["base_model"] == "acme/Llama-3-8B" and meta["base_model_relation"] == "quantized"
    other = make_work(tmp_path, source=str(src), name="other")
    result = CliRunner().invoke(cli, ["publish", str(other), "--repo", "alice/other-exl2", "--no-base-model"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("args", "expect"), [
    (["--repo", "not a repo"], "is not valid"),
    (["--repo", "a/b/c"], "exactly USER/NAME"),
    (["--repo", REPO, "--base-model", "not/a/model"], "e.g. --base-model"),
    (["--repo", REPO, "--base-model", "bad id!/x"], "is not valid"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, fake: FakeHub, args: list[str], expect: str) -> None:
    work = make_work(tmp_path)
    result = CliRunner().invoke(cli, ["publish", str(work), *args])
    assert result.exit_code == 1
    assert expect in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_run_to_the_hub_without_base_model_stops_before_any_work(tmp_path: Path, fake: FakeHub, tiny_llama: Path,
                                                                converter_double: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(hub, "token", lambda: "hf_fake")
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id: None)
    model = tmp_path / "my-finetune"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.pop("_name_or_path", None)  # nothing says who this model is on the Hub
    (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{model}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n[publish]\nrepo = "{REPO}"\n')
    r = CliRunner().invoke(cli, ["run", str(recipe)])
    assert r.exit_code == 1 and "pass --base-model USER/NAME" in r.stderr
    assert not (tmp_path / "w" / "calibration").exists()  # stopped before the first step
    fake.api.create_repo.assert_not_called()  # type: ignore[attr-defined]
