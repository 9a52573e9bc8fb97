"""Refusals before any work: the names that become folders and git refs, and the paths quantkit writes.

Every name and path a user gives is checked here once, when a recipe or the flags are read, so that a
bad one stops the job before calibration or any GPU work, and nothing is ever written into the source
model folder or outside the work folder:

- a branch name becomes `WORK/jobs/<name>`, `WORK/out/<name>` and a Hub/git branch: one pattern for
  all three (no separators, no `..`, no leading dot or dash, git's `.lock` suffix refused);
- a path is compared *resolved* (symlinks followed, `..` collapsed) with the model folder, so a link or
  a relative spelling cannot reach it;
- a branch folder must stay inside WORK even when a folder on the way is a symlink.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from quantkit.errors import DuplicateBranchName, InvalidBranchName, PathLeavesWork, PathOverlapsModel, PathOverlapsWork
from quantkit.files import check_folder_path

#: Letters, digits, '.', '_' and '-', starting with a letter or digit; at most 100 characters.
BRANCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: The work folder's subfolders that quantkit fills and deletes (rmtree on --force-settings).
MANAGED = ("calibration", "adapted", "measure", "jobs", "out", "publish", "hub-repo")


def check_branch_name(name: object, *, source: str | None = None) -> str:
    """`name` when it is safe as a folder name and as a Hub/git branch.

    Raises:
        InvalidBranchName.
    """
    if (not isinstance(name, str) or not BRANCH_NAME.match(name) or ".." in name
            or name.endswith((".", ".lock"))):
        raise InvalidBranchName(str(name), source)
    return name


def check_unique_branches(names: Iterable[str], *, source: str | None = None) -> None:
    """Raises DuplicateBranchName for the first name given twice (two bitrates would share a folder)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DuplicateBranchName(name, source)
        seen.add(name)


def resolved(path: Path | str) -> Path:
    """`path` absolute, with `~`, `..` and every symlink on its existing part resolved."""
    return Path(path).expanduser().resolve(strict=False)


def is_within(path: Path | str, folder: Path | str) -> bool:
    """True when `path` is `folder` or lies inside it, both resolved."""
    p, f = resolved(path), resolved(folder)
    return p == f or f in p.parents


def local_model_dir(ref: str | Path | None) -> Path | None:
    """The model folder a model reference names, or None for a Hub id (or nothing)."""
    if ref is None:
        return None
    p = Path(ref).expanduser()
    return p if p.is_dir() else None


def refuse_in_model(path: Path | str | None, model_dir: Path | str | None, *, what: str) -> None:
    """Raises PathOverlapsModel when `path` is the model folder or inside it."""
    if path is None or model_dir is None:
        return
    if is_within(path, model_dir):
        raise PathOverlapsModel(what, Path(path), resolved(model_dir))


def refuse_overlap(path: Path | str | None, model_dir: Path | str | None, *, what: str) -> None:
    """Like `refuse_in_model`, and also when the model folder lies inside `path` (a git checkout there
    would follow its branches over the model's files)."""
    if path is None or model_dir is None:
        return
    refuse_in_model(path, model_dir, what=what)
    if is_within(model_dir, path):
        raise PathOverlapsModel(what, Path(path), resolved(model_dir))


def check_work_folder(work: Path, model_dir: Path | str | None) -> None:
    """WORK may not be (or lie inside) the model folder, nor the model folder lie inside a subfolder
    quantkit fills and deletes; and no file may sit where WORK or a folder above it should be.

    Raises:
        PathOverlapsModel, OutputPathInvalid.
    """
    check_folder_path(work)
    if model_dir is None:
        return
    refuse_in_model(work, model_dir, what="--work")
    for name in MANAGED:
        if is_within(model_dir, work / name):
            raise PathOverlapsModel("--work", work, resolved(model_dir))


def check_in_work(folder: Path, work: Path, *, what: str) -> Path:
    """`folder` when it resolves inside WORK (a symlinked `jobs/` or `out/` could lead anywhere).

    Raises:
        PathLeavesWork.
    """
    if not is_within(folder, work) or resolved(folder) == resolved(work):
        raise PathLeavesWork(what, folder, resolved(work))
    return folder


def recorded_model_dir(work: Path) -> Path | None:
    """The source model folder a work folder records (recipe.json's model_dir, else its model), when
    it is a local folder."""
    from quantkit.errors import QuantkitError
    from quantkit.workfolder import read_settings, source_model

    try:
        record = read_settings(work)
        ref = record.model_dir if record is not None else source_model(work)
    except QuantkitError:  # a corrupt record is refused by the reader that needs it
        return None
    return local_model_dir(ref)


def check_publish_paths(work: Path, to: Path | None) -> None:
    """`publish --to`: never the model folder (git init there would sit over the user's weights), nor
    a folder holding it, nor the work folder or one quantkit fills.

    Raises:
        PathOverlapsModel, PathOverlapsWork.
    """
    if to is None:
        return
    refuse_overlap(to, recorded_model_dir(work), what="--to")
    if resolved(to) == resolved(work) or any(is_within(to, work / name) for name in MANAGED if name != "hub-repo"):
        raise PathOverlapsWork("--to", to, resolved(work))
