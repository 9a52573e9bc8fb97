"""The work folder contract shared by measure/convert/run and card/publish.

    WORK/recipe.json                     the frozen run spec
    WORK/state.json                      the run state; publishing adds "published"
    WORK/measurement.json                the measurement
    WORK/measurement.provenance.json     quantkit's provenance of it
    WORK/out/<branch>/                   the cleaned, publishable folder per bitrate (+ quantkit.json)

Readers here are tolerant of key spellings, because the writer lives in another module; `state.json`
is only ever updated under a file lock with an atomic replace, merging with whatever keys are there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from quantkit.errors import ConfigUnreadable
from quantkit.files import write_text_atomic

MEASUREMENT = "measurement.json"
PROVENANCE = "measurement.provenance.json"
RECIPE = "recipe.json"
STATE = "state.json"
BRANCH_PROVENANCE = "quantkit.json"


def is_work_folder(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in (MEASUREMENT, RECIPE, STATE, "out"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigUnreadable(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigUnreadable(path, "not a JSON object")
    return data


def pick(data: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` present in `data` (dotted keys reach into nested objects)."""
    for key in keys:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return default


def converted_branches(work: Path) -> list[str]:
    """Branches with a publishable folder: WORK/out/<branch>/ holding safetensors and config.json."""
    out = work / "out"
    if not out.is_dir():
        return []
    found = [p.name for p in out.iterdir() if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))]
    return sorted(found, key=_branch_sort_key)


def _branch_sort_key(name: str) -> tuple[float, str]:
    try:
        return (-float(name.replace("_", ".", 1).split("bpw")[0]), name)
    except ValueError:
        return (0.0, name)


def source_model(work: Path) -> str | None:
    """The source model reference (a Hub id or a path) as the provenance or recipe records it."""
    prov = read_json(work / PROVENANCE)
    recipe = read_json(work / RECIPE)
    ref = pick(prov, "source_model", "model_ref", "source.model", "model.ref", "model", "source")
    if not isinstance(ref, str):
        ref = pick(recipe, "model.ref", "model.id", "model.path", "model", "source_model", "settings.model")
    return ref if isinstance(ref, str) else None


# ---- state.json -------------------------------------------------------------------------------------


def update_state(work: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read state.json, apply `change` to it in place, write it back atomically; returns the new state.

    Holds WORK/state.json.lock meanwhile, so a publish thread and the run's state machine (which should
    use this function too) never lose each other's keys.
    """
    path = work / STATE
    with FileLock(str(path) + ".lock"):
        state = read_json(path)
        change(state)
        write_text_atomic(path, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return state
