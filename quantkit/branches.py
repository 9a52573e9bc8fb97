"""Branch sets: which bitrates to publish, each on its own Hub branch. Data lives in `branches/`."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from quantkit.errors import ConfigUnreadable
from quantkit.units import branch_name
from quantkit.vram import check_bits, check_head_bits

BRANCH_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class Branch(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    bits: float
    head_bits: int = 8
    description: str = ""

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
    return Path(str(resources.files(f"quantkit._{name}")))


def default_branches() -> list[Branch]:
    return load_branch_file(data_dir("branches") / "default.toml")


def load_branch_file(path: Path | object) -> list[Branch]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))  # type: ignore[attr-defined]
        return [Branch(**b) for b in data["branch"]]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigUnreadable(Path(str(path)), f"not a branch set ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc


def branches_for(bits: list[float], head_bits: int) -> list[Branch]:
    """Branches for explicit bitrates, borrowing the default descriptions where the bitrate matches."""
    known = {b.bits: b.description for b in default_branches()}
    return [Branch(name=branch_name(b), bits=b, head_bits=head_bits, description=known.get(b, "")) for b in bits]
