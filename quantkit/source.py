"""Who the source model is on the Hub: its repo id (the card's `base_model`) and revision, however the
user named it (a Hub id, a folder in the Hugging Face cache, or a folder whose config.json names it).

The work folder records the answer (`SourceRecord`) when the work starts, so `quantkit card` and
`quantkit publish` run later, from any folder, still know it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from quantkit.errors import InvalidRepoId
from quantkit.workfolder import SourceRecord, read_settings

#: huggingface_hub's cache layout: HF_HUB_CACHE/models--<org>--<name>/snapshots/<commit>/
_CACHE_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_id(ref: str | None) -> str | None:
    """`ref` when it is a Hub repo id USER/NAME (and not an existing local path), else None."""
    if not ref or ref.count("/") != 1 or Path(ref).expanduser().exists():
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def check_hub_id(value: str, *, option: str = "--base-model") -> str:
    """A Hub repo id given by the user (USER/NAME, the Hub's own rules), or InvalidRepoId."""
    if value.count("/") != 1:
        raise InvalidRepoId(value, "it must be exactly USER/NAME", option)
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise InvalidRepoId(value, str(exc).splitlines()[0], option) from exc
    return value


def _from_cache_path(folder: Path) -> tuple[str, str] | None:
    """(hub id, commit) for a snapshot folder of the Hugging Face cache."""
    parts = folder.resolve().parts
    for i in range(len(parts) - 2):
        m = _CACHE_SNAPSHOT.match(parts[i])
        if m and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            return f"{m['org']}/{m['name']}", parts[i + 2]
    return None


def _from_config(folder: Path) -> str | None:
    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return hub_id(name) if isinstance(name, str) else None


def identify(ref: str, folder: Path | None) -> SourceRecord:
    """The source named `ref` (as the user gave it), whose files are in `folder`.

    The Hub id comes from, in order: `ref` itself, the Hugging Face cache path of `folder` (with its
    commit), or config.json's `_name_or_path` when that is a Hub id. Never from the source's own card:
    its `base_model` names the source's parent, not the source.
    """
    path = str(folder.expanduser().resolve()) if folder is not None else None
    named = hub_id(ref)
    cached = _from_cache_path(folder) if folder is not None else None
    if named is not None:
        revision = cached[1] if cached is not None and cached[0] == named else None
        return SourceRecord(path=path, hub_id=named, revision=revision)
    if cached is not None:
        return SourceRecord(path=path, hub_id=cached[0], revision=cached[1], how=f"{folder} is in the Hugging Face cache")
    configured = _from_config(folder) if folder is not None else None
    if configured is not None:
        return SourceRecord(path=path, hub_id=configured, how="config.json's _name_or_path")
    return SourceRecord(path=path)


def read_source(work: Path) -> SourceRecord | None:
    """The source as WORK/recipe.json records it (`Pipeline.lock` writes it), or None for older folders."""
    settings = read_settings(work)
    return settings.source if settings is not None else None


def published_name(ref: str, folder: str | Path | None = None) -> str:
    """How files quantkit publishes name the source model: its Hub id (also for a folder in the Hugging
    Face cache, `.../models--ORG--NAME/snapshots/REV`), else the name of its folder. Never a local path.

    Args:
        ref: the model as the user named it (a Hub id or a path).
        folder: the folder the weights were read from, when there is one.
    """
    if hub_id(ref) is not None:
        return ref
    for candidate in (Path(ref), Path(folder) if folder is not None else None):
        if candidate is None:
            continue
        parts = candidate.expanduser().parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3].removeprefix("models--").replace("--", "/")
    return Path(ref).expanduser().resolve().name or ref
