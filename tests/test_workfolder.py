"""The work folder contract: every record round-trips through the model that writes it, a file of another
format version is refused with a clear error, and a file of another shape is not guessed at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.errors import WorkFolderCorrupt, WorkFolderIncompatible
from quantkit.workfolder import (
    FORMAT_VERSION,
    BranchProvenance,
    MeasurementProvenance,
    PublishRecord,
    SettingsRecord,
    State,
    StateRecord,
    Work,
    read_record,
    read_settings,
    read_state,
    source_model,
    update_state,
    write_record,
)
from workfolders import make_work


def test_every_record_of_a_built_folder_reads_back_with_its_model(tmp_path: Path) -> None:
    work = Work(make_work(tmp_path, branches=("8_0",)))
    for cls, path in [(SettingsRecord, work.settings), (MeasurementProvenance, work.provenance),
                      (BranchProvenance, work.branch_provenance("8_0"))]:
        record = read_record(cls, path)
        assert record is not None and record.version == FORMAT_VERSION
        write_record(tmp_path / "again.json", record)
        assert read_record(cls, tmp_path / "again.json") == record
    assert source_model(work.root) == "alice/tiny-llama"


def test_state_changes_merge_under_the_lock(tmp_path: Path) -> None:
    work = Work(tmp_path / "w")
    State(work).mark("calibration", "done", sha256="ab" * 32, tokens=640)
    update_state(work.root, lambda s: s.model_copy(update={"published": {"main": {"git:r": PublishRecord(verified=True, at="t")}}}))
    State(work).mark("measure", "running")  # a second State instance keeps what the publisher wrote
    state = read_state(work.root)
    assert state.steps["calibration"].info.tokens == 640 and state.steps["measure"].status == "running"
    assert state.published["main"]["git:r"].verified
    raw = json.loads(work.state.read_text())
    assert raw["version"] == FORMAT_VERSION and raw["steps"]["measure"]["info"] == {}  # no unset fields written


def test_a_missing_file_is_none_and_missing_state_is_empty(tmp_path: Path) -> None:
    assert read_settings(tmp_path) is None and read_state(tmp_path) == StateRecord() and source_model(tmp_path) is None


@pytest.mark.parametrize("version", [0, 2, "x"])
def test_another_format_version_is_refused(tmp_path: Path, version: object) -> None:
    work = Work(make_work(tmp_path))
    data = json.loads(work.settings.read_text()) | {"version": version}
    work.settings.write_text(json.dumps(data))
    with pytest.raises((WorkFolderIncompatible, WorkFolderCorrupt)) as info:
        read_settings(work.root)
    if version != "x":
        assert isinstance(info.value, WorkFolderIncompatible) and info.value.found == version


def test_files_from_before_the_version_field_are_format_1(tmp_path: Path) -> None:
    work = Work(make_work(tmp_path))
    data = json.loads(work.settings.read_text())
    del data["version"]
    work.settings.write_text(json.dumps(data))
    assert read_settings(work.root) is not None


@pytest.mark.parametrize("text, needle", [
    ("{", "Invalid JSON"),
    ("[1]", "should be an object"),
    # the schema tests once wrote by hand: top-level keys instead of `settings`, nothing guessed from them
    ('{"model": "a/b", "branches": []}', "settings"),
])
def test_another_shape_is_refused_not_guessed(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "recipe.json").write_text(text)
    with pytest.raises(WorkFolderCorrupt) as info:
        read_settings(tmp_path)
    assert needle in info.value.reason


def test_cli_says_it_in_one_line(tmp_path: Path) -> None:
    work = Work(make_work(tmp_path))
    work.state.write_text(json.dumps({"version": 7}))
    r = CliRunner().invoke(cli, ["publish", str(work.root), "--repo", "alice/x", "--to", str(tmp_path / "repo")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "work-folder format 7" in r.stderr and "use a new --work folder" in r.stderr
