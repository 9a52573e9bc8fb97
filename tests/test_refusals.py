"""Bad input across every command, refused before any work with one line and exit status 1, and the
user's model folder hashed before and after every case (tests/guarded.py).

Each case builds its world in a fresh tmp folder holding a copy of the tiny model (`M`), a work folder
path (`W`, often not created yet), and a `precious` folder outside both that a bad name tried to reach.
The table says what the command is, what the one line must contain, and what must not exist after.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from guarded import copy_model, tree_hash
from quantkit.cli.main import cli
from workfolders import make_work


@dataclass
class World:
    tmp: Path
    model: Path
    work: Path
    precious: Path

    def recipe(self, body: str, *, model: str | None = None, work: str | None = None, name: str = "r.toml") -> Path:
        head = [f'model = "{model or self.model}"', f'work = "{work or self.work}"', "rows = 2", "measurement_rows = 2", "length = 64"]
        path = self.tmp / name
        path.write_text("\n".join(head) + "\n" + body + "\n")
        return path


BR = '[[branches]]\nname = "{}"\nbits = 6.5\n'


@dataclass
class Case:
    id: str
    args: Callable[[World], list[str]]
    needle: str
    setup: Callable[[World], None] = lambda w: None
    absent: Callable[[World], list[Path]] = field(default=lambda w: [])  # must not exist afterwards


def _link(w: World, name: str, to: Path) -> Path:
    (w.tmp / name).symlink_to(to, target_is_directory=True)
    return w.tmp / name


def _converted(w: World) -> None:
    """W as a converted work folder made from M."""
    made = make_work(w.tmp, model_folder=w.model, name="made")
    made.rename(w.work)


def _state(text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        w.work.mkdir()
        (w.work / "state.json").write_text(text)
    return setup


def _recipe_json(text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        w.work.mkdir()
        (w.work / "recipe.json").write_text(text)
    return setup


def _bad_tokenizer(w: World) -> None:
    (w.model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')


def _chats(text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.tmp / "chats.jsonl").write_text(text)
    return setup


def _file(name: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.tmp / name).write_text("not a folder")
    return setup


RUN = ["run"]
CASES = [
    # ---- branch names: one pattern for recipe, --bits and publish, checked when the recipe is read
    Case("run-name-escapes-work", lambda w: RUN + [str(w.recipe(BR.format("../../precious")))], "branch name '../../precious'",
         absent=lambda w: [w.work]),
    Case("run-name-absolute-model", lambda w: RUN + [str(w.recipe(BR.format(w.model)))], "is not allowed", absent=lambda w: [w.work]),
    Case("run-name-dotdot", lambda w: RUN + [str(w.recipe(BR.format("..")))], "branch name '..'", absent=lambda w: [w.work]),
    Case("run-name-dot", lambda w: RUN + [str(w.recipe(BR.format(".")))], "branch name '.'", absent=lambda w: [w.work]),
    Case("run-name-slash", lambda w: RUN + [str(w.recipe(BR.format("a/b")))], "branch name 'a/b'", absent=lambda w: [w.work]),
    Case("run-name-leading-dash", lambda w: RUN + [str(w.recipe(BR.format("-rf")))], "branch name '-rf'", absent=lambda w: [w.work]),
    Case("run-name-git-lock", lambda w: RUN + [str(w.recipe(BR.format("x.lock")))], "branch name 'x.lock'", absent=lambda w: [w.work]),
    Case("run-name-empty", lambda w: RUN + [str(w.recipe(BR.format("")))], "branch name ''", absent=lambda w: [w.work]),
    Case("run-name-inner-dotdot", lambda w: RUN + [str(w.recipe(BR.format("a..b")))], "branch name 'a..b'", absent=lambda w: [w.work]),
    Case("run-name-not-a-string", lambda w: RUN + [str(w.recipe('[[branches]]\nname = 6\nbits = 6.5\n'))], "branch name '6'",
         absent=lambda w: [w.work]),
    Case("run-duplicate-names", lambda w: RUN + [str(w.recipe(BR.format("6_5") + BR.format("6_5")))], "branch name '6_5' is given twice",
         absent=lambda w: [w.work]),
    Case("run-branch-set-file-bad-name",
         lambda w: RUN + [str(w.recipe('branches = "set.toml"'))], "set.toml is not allowed",
         setup=lambda w: (w.tmp / "set.toml").write_text(BR.replace("branches", "branch").format("../x")), absent=lambda w: [w.work]),
    Case("convert-bits-duplicate", lambda w: ["convert", str(w.model), "--work", str(w.work), "--bits", "6.5,6.50"],
         "branch name '6_5' is given twice in --bits", absent=lambda w: [w.work]),
    # ---- recipe keys: an unknown key anywhere is named with its file
    Case("run-unknown-branch-key", lambda w: RUN + [str(w.recipe(BR.format("6_5") + "head_bit = 6\n"))],
         "unknown key 'head_bit' in [[branch]]", absent=lambda w: [w.work]),
    Case("run-unknown-top-key", lambda w: RUN + [str(w.recipe('rowz = 3'))], "r.toml: unknown key 'rowz' in the recipe",
         absent=lambda w: [w.work]),
    Case("run-unknown-publish-key", lambda w: RUN + [str(w.recipe('[publish]\nrepository = "a/b"'))], "unknown key 'repository' in [publish]",
         absent=lambda w: [w.work]),
    Case("run-branch-set-unknown-key", lambda w: RUN + [str(w.recipe('branches = "set.toml"'))], "set.toml: unknown key 'head_bit'",
         setup=lambda w: (w.tmp / "set.toml").write_text('[[branch]]\nname = "6_5"\nbits = 6.5\nhead_bit = 6\n'), absent=lambda w: [w.work]),
    Case("calibration-recipe-unknown-key", lambda w: ["calibration", "show", str(w.tmp / "cal.toml")],
         "cal.toml: unknown key 'sourc' in the calibration recipe", setup=lambda w: (w.tmp / "cal.toml").write_text('sourc = "x.txt"\n')),
    Case("run-branch-and-branches", lambda w: RUN + [str(w.recipe('[[branch]]\nname = "a"\nbits = 6.5\n' + BR.format("b")))],
         "both `branch` and `branches`", absent=lambda w: [w.work]),
    # ---- paths: resolved (symlinks too) and refused when they reach the model folder
    Case("run-work-is-model", lambda w: RUN + [str(w.recipe(BR.format("6_5"), work=str(w.model)))], "overlaps the model folder"),
    Case("run-work-inside-model", lambda w: RUN + [str(w.recipe(BR.format("6_5"), work=str(w.model / "w")))], "overlaps the model folder",
         absent=lambda w: [w.model / "w"]),
    Case("run-work-flag-is-model", lambda w: RUN + [str(w.recipe(BR.format("6_5"))), "--work", str(w.model)], "--work"),
    Case("run-work-symlink-to-model", lambda w: RUN + [str(w.recipe(BR.format("6_5"), work=str(w.tmp / "link")))], "overlaps the model folder",
         setup=lambda w: _link(w, "link", w.model) and None),
    Case("run-work-dotdot-into-model", lambda w: RUN + [str(w.recipe(BR.format("6_5"), work=str(w.tmp / "x" / ".." / "model")))],
         "overlaps the model folder"),
    Case("run-publish-to-model", lambda w: RUN + [str(w.recipe(f'[publish]\nto = "{w.model}"'))], "[publish] to",
         absent=lambda w: [w.model / ".git", w.work]),
    Case("run-publish-to-holds-model", lambda w: RUN + [str(w.recipe(f'[publish]\nto = "{w.tmp}"'))], "[publish] to",
         absent=lambda w: [w.tmp / ".git", w.work]),
    Case("run-model-inside-work-out", lambda w: RUN + [str(w.recipe(BR.format("6_5"), model=str(w.tmp / "w2" / "out" / "6_5"),
                                                                        work=str(w.tmp / "w2")))], "overlaps the model folder",
         setup=lambda w: (w.tmp / "w2" / "out").mkdir(parents=True) or os.replace(w.model, w.tmp / "w2" / "out" / "6_5")
         or (w.tmp / "w2" / "out" / "6_5").rename(w.tmp / "w2" / "out" / "6_5") or _relink_model(w, w.tmp / "w2" / "out" / "6_5")),
    Case("measure-work-is-model", lambda w: ["measure", str(w.model), "--work", str(w.model)], "--work"),
    Case("measure-work-inside-model", lambda w: ["measure", str(w.model), "--work", str(w.model / "work")], "overlaps the model folder",
         absent=lambda w: [w.model / "work"]),
    Case("convert-work-symlink-to-model", lambda w: ["convert", str(w.model), "--work", str(w.tmp / "link")], "overlaps the model folder",
         setup=lambda w: _link(w, "link", w.model) and None),
    Case("calibration-out-is-model", lambda w: ["calibration", "build", "default", "--model", str(w.model), "--out", str(w.model)],
         "--out"),
    Case("calibration-out-inside-model", lambda w: ["calibration", "build", "default", "--model", str(w.model), "--out", str(w.model / "cal")],
         "overlaps the model folder", absent=lambda w: [w.model / "cal"]),
    Case("card-output-into-model", lambda w: ["card", str(w.model), "--output", str(w.model / "README.md")], "--output"),
    Case("card-output-into-recorded-model", lambda w: ["card", str(w.work), "--output", str(w.model / "README.md")], "--output",
         setup=_converted),
    Case("publish-to-model", lambda w: ["publish", str(w.work), "--repo", "a/b", "--to", str(w.model)], "--to",
         setup=_converted, absent=lambda w: [w.model / ".git"]),
    Case("publish-to-inside-model", lambda w: ["publish", str(w.work), "--repo", "a/b", "--to", str(w.model / "repo")], "--to",
         setup=_converted, absent=lambda w: [w.model / "repo"]),
    Case("publish-to-parent-of-model", lambda w: ["publish", str(w.work), "--repo", "a/b", "--to", str(w.tmp)], "overlaps the model folder",
         setup=_converted, absent=lambda w: [w.tmp / ".git"]),
    Case("publish-to-symlink-to-model", lambda w: ["publish", str(w.work), "--repo", "a/b", "--to", str(w.tmp / "link")], "overlaps the model folder",
         setup=lambda w: (_converted(w), _link(w, "link", w.model)) and None, absent=lambda w: [w.model / ".git"]),
    Case("publish-to-work", lambda w: ["publish", str(w.work), "--repo", "a/b", "--to", str(w.work)], "is the work folder",
         setup=_converted, absent=lambda w: [w.work / ".git"]),
    Case("publish-to-work-out", lambda w: ["publish", str(w.work), "--repo", "a/b", "--to", str(w.work / "out")], "is the work folder",
         setup=_converted, absent=lambda w: [w.work / "out" / ".git"]),
    # ---- branch folders that would leave WORK through a symlink
    Case("convert-jobs-symlink-out", lambda w: ["convert", str(w.model), "--work", str(w.work), "--bits", "6.5"], "outside the work folder",
         setup=lambda w: (w.work.mkdir(), (w.work / "jobs").symlink_to(w.precious, target_is_directory=True)) and None),
    # ---- internal errors that were "unexpected ... please report it"
    Case("state-json-list", lambda w: ["measure", str(w.model), "--work", str(w.work)], "state.json", setup=_state("[]")),
    Case("state-json-truncated", lambda w: ["measure", str(w.model), "--work", str(w.work)], "state.json", setup=_state('{"steps": {')),
    Case("recipe-json-corrupt", lambda w: ["measure", str(w.model), "--work", str(w.work)], "recipe.json", setup=_recipe_json("{nope")),
    Case("recipe-json-list", lambda w: ["convert", str(w.model), "--work", str(w.work)], "recipe.json", setup=_recipe_json("[1, 2]")),
    Case("tokenizer-corrupt", lambda w: ["calibration", "build", "default", "--model", str(w.model), "--out", str(w.tmp / "cal")],
         "tokenizer.json: not a tokenizer", setup=_bad_tokenizer, absent=lambda w: [w.tmp / "cal"]),
    Case("messages-not-json", lambda w: ["calibration", "build", str(w.tmp / "chats.jsonl"), "--model", str(w.model), "--out", str(w.tmp / "cal"),
                                         "--messages-column", "messages", "--rows", "1", "--length", "8"],
         "not JSON chat turns", setup=_chats('{"messages": "hello there"}\n' * 4), absent=lambda w: [w.tmp / "cal"]),
    Case("messages-not-turns", lambda w: ["calibration", "build", str(w.tmp / "chats.jsonl"), "--model", str(w.model), "--out", str(w.tmp / "cal"),
                                          "--messages-column", "messages", "--rows", "1", "--length", "8"],
         "not a list of chat turns", setup=_chats('{"messages": "{\\"a\\": 1}"}\n' * 4), absent=lambda w: [w.tmp / "cal"]),
    Case("calibration-out-under-a-file", lambda w: ["calibration", "build", "default", "--model", str(w.model), "--out", str(w.tmp / "f" / "cal")],
         "is a file, not a folder", setup=_file("f")),
    Case("card-output-under-a-file", lambda w: ["card", str(w.work), "--output", str(w.tmp / "f" / "README.md")], "pick another output path",
         setup=lambda w: (_converted(w), _file("f")(w)) and None),
    Case("measure-work-under-a-file", lambda w: ["measure", str(w.model), "--work", str(w.tmp / "f" / "w")], "is a file, not a folder", setup=_file("f")),
]


def _relink_model(w: World, new: Path) -> None:
    w.model = new


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_and_the_model_folder_is_untouched(case: Case, tmp_path, tiny_llama, converter_double):
    w = World(tmp=tmp_path, model=copy_model(tiny_llama, tmp_path / "model"), work=tmp_path / "w", precious=tmp_path / "precious")
    w.precious.mkdir()
    (w.precious / "README.md").write_text("mine")
    (w.precious / "notes.gguf").write_text("mine too")
    case.setup(w)
    before_model, before_precious = tree_hash(w.model), tree_hash(w.precious)
    r = CliRunner().invoke(cli, case.args(w))
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.output and "please report" not in r.output, r.output
    assert lines and lines[-1].startswith("error:") and case.needle in lines[-1], r.output
    assert tree_hash(w.model) == before_model  # the user's model folder: not one byte, mode or file changed
    assert tree_hash(w.precious) == before_precious
    for path in case.absent(w):
        assert not path.exists(), path


def test_debug_keeps_the_traceback(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("QUANTKIT_DEBUG", "1")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "state.json").write_text("[]")
    r = CliRunner().invoke(cli, ["measure", str(tiny_llama), "--work", str(tmp_path / "w")])
    assert r.exit_code != 0 and type(r.exception).__name__ == "WorkFolderCorrupt"


def test_branch_tables_are_read_under_either_name(tmp_path, tiny_llama, converter_double):
    for table in ("branch", "branches"):
        path = tmp_path / f"{table}.toml"
        path.write_text(f'model = "{tiny_llama}"\nwork = "w"\n[[{table}]]\nname = "6_5"\nbits = 6.5\n')
        r = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
        assert r.exit_code == 0, r.output
        assert "convert:6_5" in r.output


def test_the_shipped_branch_set_reads(tmp_path):
    from quantkit.branches import default_branches

    assert [b.name for b in default_branches()] == ["8_0", "6_5", "5_0"]


def test_a_hand_made_work_folder_with_a_bad_out_name_is_not_published(tmp_path):
    work = make_work(tmp_path, branches=("8_0",))
    (work / "out" / "8_0").rename(work / "out" / "-8_0")
    r = CliRunner().invoke(cli, ["publish", str(work), "--repo", "a/b", "--to", str(tmp_path / "repo")])
    assert r.exit_code == 1 and "branch name '-8_0'" in r.output


def test_json_files_the_guards_read_are_quantkits_own(tmp_path, tiny_llama):
    # a work folder's recorded model is what publish --to is compared with, even after the model moved
    work = make_work(tmp_path, model_folder=tiny_llama)
    assert json.loads((work / "recipe.json").read_text())["model_dir"] == str(tiny_llama)


@pytest.mark.parametrize("denied", ["recipe.json", ".quantkit.lock.holder.json"])
def test_a_work_folder_that_cannot_be_written_is_one_line(denied, tmp_path, tiny_llama, converter_double, monkeypatch):
    """As root (the test machines) chmod does not stop a write: the refusal the OS would give is injected
    at the one rename every write ends in."""
    from quantkit import files

    real = files._commit

    def commit(tmp: str, path: Path) -> None:
        if Path(path).name == denied:
            raise PermissionError(13, "Permission denied", str(path))
        real(tmp, path)

    monkeypatch.setattr(files, "_commit", commit)
    r = CliRunner().invoke(cli, ["convert", str(tiny_llama), "--work", str(tmp_path / "w"), "--bits", "6.5"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "make the work folder writable" in r.output.strip().splitlines()[-1], r.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_work_folder_is_one_line(tmp_path, tiny_llama, converter_double):
    work = tmp_path / "w"
    work.mkdir()
    work.chmod(0o555)
    try:
        r = CliRunner().invoke(cli, ["measure", str(tiny_llama), "--work", str(work)])
    finally:
        work.chmod(0o755)
    assert r.exit_code == 1 and "make the work folder writable" in r.output, r.output
