"""Branch sets: which bitrates to publish, each on its own Hub branch. Data lives in `branches/`."""

from __future__ import annotations

import tomllib
import importlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from quantkit.errors import ConfigUnreadable, RecipeUnknownKey
from quantkit.guards import check_branch_name, check_unique_branches
from quantkit.units import branch_name
from quantkit.vram import check_bits, check_head_bits


class Branch(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    bits: float
    head_bits: int = 8
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_branch_name(v)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: float) -> float:
        return check_bits(v)

    @field_validator("head_bits")
    @classmethod
    def _head_bits(cls, v: int) -> int:
        return check_head_bits(v)


def data_dir(name: str) -> Path:
    """A top-level data folder (`branches`, `calibration`): from the checkout, or as installed inside the
    package (pyproject maps it to `quantkit._<name>`)."""
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    return installed_data_dir(name)


def installed_data_dir(name: str) -> Path:
    """The data folder inside an installed quantkit. The folders have no __init__.py, so they install as
    namespace packages: `importlib.resources.files` gives a MultiplexedPath, whose str() is its repr, not
    a path; the package's own `__path__` is the real folder."""
    try:
        locations = list(importlib.import_module(f"quantkit._{name}").__path__)
    except ModuleNotFoundError:
        locations = []
    if not locations:
        raise ConfigUnreadable(Path(f"quantkit/_{name}"), "this installation of quantkit lacks its data folder; reinstall quantkit-exl2")
    return Path(locations[0])


def default_branches() -> list[Branch]:
    return load_branch_file(data_dir("branches") / "default.toml")


def load_branch_file(path: Path | object) -> list[Branch]:
    """A branch-set file: `[[branch]]` tables (`[[branches]]` is read the same).

    Raises:
        ConfigUnreadable, RecipeUnknownKey, InvalidBranchName, DuplicateBranchName.
    """
    file = Path(str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))  # type: ignore[attr-defined]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigUnreadable(file, f"not a branch set ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    for key in data:
        if key not in ("branch", "branches"):
            raise RecipeUnknownKey(file, key, "the branch set", ["[[branch]]"])
    if "branch" in data and "branches" in data:
        raise ConfigUnreadable(file, "not a branch set (it has both [[branch]] and [[branches]]: use one)")
    tables = data.get("branch", data.get("branches"))
    if not isinstance(tables, list) or not tables:
        raise ConfigUnreadable(file, "not a branch set (no [[branch]] tables)")
    return branches_from_tables(tables, file=file, table="[[branch]]")


def branches_from_tables(tables: list[Any], *, file: Path, table: str) -> list[Branch]:
    """Branches from TOML tables, each key checked against `Branch`'s fields and each name against the
    one branch-name pattern, before anything is built.

    Raises:
        ConfigUnreadable, RecipeUnknownKey, InvalidBranchName, DuplicateBranchName.
    """
    known = list(Branch.model_fields)
    out = []
    for t in tables:
        if not isinstance(t, dict):
            raise ConfigUnreadable(file, f"{table} must be tables with name and bits")
        for key in t:
            if key not in known:
                raise RecipeUnknownKey(file, key, table, known)
        check_branch_name(t.get("name"), source=str(file))
        try:
            out.append(Branch(**t))
        except (TypeError, ValidationError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else None
            why = f"{first['loc'][0]}: {first['msg']}" if first else str(exc).splitlines()[0]
            raise ConfigUnreadable(file, f"bad {table} {t.get('name')!r} ({why})") from exc
    check_unique_branches((b.name for b in out), source=str(file))
    return out


def branches_for(bits: list[float], head_bits: int) -> list[Branch]:
    """Branches for explicit bitrates, borrowing the default descriptions where the bitrate matches."""
    known = {b.bits: b.description for b in default_branches()}
    out = [Branch(name=branch_name(b), bits=b, head_bits=head_bits, description=known.get(b, "")) for b in bits]
    check_unique_branches((b.name for b in out), source="--bits")
    return out
