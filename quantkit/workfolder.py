"""The work folder: its layout and the typed records quantkit keeps in it, in one place.

    WORK/recipe.json                    SettingsRecord: the frozen settings and the model fingerprint
    WORK/state.json                     StateRecord: one StepState per step, and what was published where
    WORK/calibration/                   calibration.parquet + manifest.json (quantkit.calibration)
    WORK/adapted/                       the architecture adapter's working copy, when exllamav2 lacks the
                                        model's architecture: the converter's -i; never the user's folder
    WORK/measure/                       exllamav2's -o for the measurement (job_new.json kept for resume)
    WORK/measurement.json               exllamav2's measurement (-om: outside any -o)
    WORK/measurement.provenance.json    MeasurementProvenance: where it came from
    WORK/jobs/<branch>/                 exllamav2's -o per bitrate (kept: a rerun resumes mid-conversion)
    WORK/out/<branch>/                  -cf, cleaned for publishing; quantkit.json is its BranchProvenance
    WORK/publish/README.md              the card as it was published
    WORK/publish/files/<branch>/        published copies of JSON files that held a local path

Each record is a frozen pydantic model written by `write_record` and read back by `read_record` with the
same model, so there is one schema and no reader guessing at key names. Every record carries `version`
(FORMAT_VERSION); a file of another format is refused with `WorkFolderIncompatible`. Files from before
the field existed are format 1. A field added with a default keeps the format; renaming or removing
one, or changing its meaning, bumps FORMAT_VERSION.

state.json is only ever changed through `update_state`: under a file lock, read, change, atomic replace,
so the run's state machine and its publish thread never lose each other's changes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantkit import __version__, guards
from quantkit.branches import Branch
from quantkit.calibration import check_count
from quantkit.errors import WorkFolderCorrupt, WorkFolderIncompatible
from quantkit.files import write_text_atomic

#: The format of every record below. Bump it when a field is renamed, removed or changes meaning.
FORMAT_VERSION = 1

# "recipe" is the TOML a user writes for `quantkit run`; the work folder's copy of the settings keeps
# its first file name, because published repos and existing work folders hold it under that name.
SETTINGS = "recipe.json"
STATE = "state.json"
MEASUREMENT = "measurement.json"
PROVENANCE = "measurement.provenance.json"
BRANCH_PROVENANCE = "quantkit.json"
CARD = "README.md"


class Work:
    """The paths of one work folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.settings = root / SETTINGS
        self.state = root / STATE
        self.calibration = root / "calibration"
        self.adapted = root / "adapted"
        self.measure = root / "measure"
        self.measurement = root / MEASUREMENT
        self.provenance = root / PROVENANCE
        self.publish = root / "publish"
        self.card = self.publish / CARD
        self.hub_repo = root / "hub-repo"

    def job(self, branch: str) -> Path:
        return guards.check_in_work(self.root / "jobs" / guards.check_branch_name(branch), self.root, what=f"branch {branch}'s job folder")

    def out(self, branch: str) -> Path:
        return guards.check_in_work(self.root / "out" / guards.check_branch_name(branch), self.root, what=f"branch {branch}'s output folder")

    def branch_provenance(self, branch: str) -> Path:
        return self.out(branch) / BRANCH_PROVENANCE


# ---- records ------------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Record(_Frozen):
    """A file of the work folder: written and read by the same model."""

    version: int = FORMAT_VERSION


class _Version(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = 1  # files from before `version` existed


class Settings(_Frozen):
    """The run spec, frozen into WORK/recipe.json; what `lock` compares on a rerun."""

    model: str
    calibration: str = "default"
    calibration_source: str | None = None
    rows: int = 100  # quantization pass (-r)
    measurement_rows: int = 16  # measurement pass (-mr)
    length: int = 2048  # tokens per row, both passes (-l, -ml)
    branches: list[Branch] = Field(default_factory=list)
    base_model: str | None = None  # the source's Hub id for the card, when `model` is a folder that does not say

    @field_validator("rows", "measurement_rows", "length")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        return check_count(info.field_name, v)

    @field_validator("base_model")
    @classmethod
    def _hub_id(cls, v: str | None) -> str | None:
        from quantkit.source import check_hub_id

        return None if v is None else check_hub_id(v, option="base_model")

    @field_validator("branches")
    @classmethod
    def _unique(cls, v: list[Branch]) -> list[Branch]:
        guards.check_unique_branches(b.name for b in v)
        return v


class SourceRecord(_Frozen):
    """The source model (`quantkit.source.identify`): where its files are and who it is on the Hub."""

    path: str | None = None  # the folder the weights were read from, absolute
    hub_id: str | None = None  # its Hub repo id, when known
    revision: str | None = None  # the commit it was downloaded at, when known
    how: str | None = None  # how the Hub id was found when the user did not name it, said on screen


class SettingsRecord(Record):
    """WORK/recipe.json."""

    settings: Settings
    model_fingerprint: str
    model_dir: str | None = None  # the folder the weights were read from (a Hub model's snapshot); not published
    quantkit_version: str = __version__
    source: SourceRecord | None = None  # None in folders from before it was recorded


Status = Literal["pending", "running", "done", "failed"]


class StepInfo(_Frozen):
    """What a step records beside its status; each step fills the fields it has."""

    sha256: str | None = None  # calibration: the manifest's; measure: measurement.json's
    tokens: int | None = None  # calibration
    bits: float | None = None  # convert
    head_bits: int | None = None  # convert
    achieved_decoder_bpw: float | None = None  # convert
    adapter: str | None = None  # adapt
    model_fingerprint: str | None = None  # adapt: the source the working copy was made from
    written_bytes: int | None = None  # adapt
    files: int | None = None  # adapt
    node: str | None = None  # on a cluster: the node that ran the step
    kl_mean: float | None = None  # eval: the branch's mean KL divergence against the unquantized model
    error: str | None = None  # failed: why, when the run knows (eval: the branch is then never published)


class StepState(_Frozen):
    status: Status = "pending"
    updated: str = ""
    info: StepInfo = StepInfo()


class PublishRecord(_Frozen):
    """One branch on one target, as the publisher last left it."""

    commit: str | None = None
    verified: bool
    at: str
    files: int | None = None
    bytes: int | None = None
    error: str | None = None  # why the last attempt failed (verified is then False)


class StateRecord(Record):
    """WORK/state.json."""

    quantkit_version: str = __version__
    steps: dict[str, StepState] = Field(default_factory=dict)
    published: dict[str, dict[str, PublishRecord]] = Field(default_factory=dict)  # branch -> target id -> record


class AdapterRecord(_Frozen):
    """The architecture adapter the converter read the model through."""

    adapter: str
    source_arch: str
    target_arch: str
    status: str
    experimental: bool
    exact: bool
    summary: str


class MeasurementProvenance(Record):
    """WORK/measurement.provenance.json: where the measurement beside it came from."""

    model_ref: str
    model_fingerprint: str
    calibration: str
    calibration_sha256: str
    rows: int
    length: int
    exllamav2_version: str
    measurement_sha256: str
    quantkit_version: str = __version__
    created: str = ""
    adapter: AdapterRecord | None = None  # None when exllamav2 reads the model as it is


class BranchCalibration(_Frozen):
    name: str
    sha256: str
    rows: int
    length: int
    measurement_rows: int
    measurement_length: int


class BranchProvenance(Record):
    """WORK/out/<branch>/quantkit.json: how this branch was made; published with it."""

    branch: str
    bits: float
    head_bits: int
    achieved_decoder_bpw: float
    achieved_head_bpw: float
    bytes: int
    reachable_bpw: tuple[float, float]
    measurement_sha256: str
    source_model: str
    model_fingerprint: str
    calibration: BranchCalibration
    exllamav2_version: str
    quantkit_version: str = __version__
    adapter: AdapterRecord | None = None
    removed_from_source_copy: list[str] = Field(default_factory=list)


# ---- reading and writing ----------------------------------------------------------------------------

R = TypeVar("R", bound=Record)


def write_record(path: Path, record: Record) -> None:
    # Unset optional fields are left out: each step's info holds only what that step records.
    write_text_atomic(path, record.model_dump_json(indent=2, exclude_none=True) + "\n")


def read_record(cls: type[R], path: Path) -> R | None:
    """The record in `path`, or None when the file does not exist.

    Raises:
        WorkFolderIncompatible: the file is of another FORMAT_VERSION.
        WorkFolderCorrupt: it is not a record of this kind.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkFolderCorrupt(path, f"unreadable ({type(exc).__name__})") from exc
    try:
        found = _Version.model_validate_json(text).version
    except ValidationError as exc:
        raise WorkFolderCorrupt(path, _first_error(exc)) from exc
    if found != FORMAT_VERSION:
        raise WorkFolderIncompatible(path, found, FORMAT_VERSION)
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        raise WorkFolderCorrupt(path, _first_error(exc)) from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def read_settings(work: Path) -> SettingsRecord | None:
    return read_record(SettingsRecord, Work(work).settings)


def read_state(work: Path) -> StateRecord:
    return read_record(StateRecord, Work(work).state) or StateRecord()


def read_provenance(work: Path) -> MeasurementProvenance | None:
    return read_record(MeasurementProvenance, Work(work).provenance)


def read_branch_provenance(folder: Path) -> BranchProvenance | None:
    """quantkit.json of a branch folder (WORK/out/<branch>)."""
    return read_record(BranchProvenance, folder / BRANCH_PROVENANCE)


def update_state(work: Path, change: Callable[[StateRecord], StateRecord]) -> StateRecord:
    """Read state.json, write back `change(state)` atomically under WORK/state.json.lock; returns it."""
    path = Work(work).state
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        state = change(read_state(work))
        write_record(path, state.model_copy(update={"version": FORMAT_VERSION, "quantkit_version": __version__}))
    return state


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the run's steps in state.json ------------------------------------------------------------------


def convert_step(branch: str) -> str:
    return f"convert:{branch}"


class State:
    """The steps of WORK/state.json as this process last saw them; every change goes through `update_state`."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.steps: dict[str, StepState] = dict(read_state(work.root).steps)

    def get(self, step: str) -> StepState:
        return self.steps.get(step, StepState())

    def done(self, step: str) -> bool:
        return self.get(step).status == "done"

    def mark(self, step: str, status: Status, **info: Any) -> None:
        merged = self.get(step).info.model_copy(update=info)
        self.steps[step] = StepState(status=status, updated=now(), info=StepInfo.model_validate(merged.model_dump()))
        # The steps are copied under the file lock: branches converting side by side (quantkit.parallel)
        # mark from several threads, and the last writer must not put back an older copy.
        update_state(self.work.root, lambda s: s.model_copy(update={"steps": dict(self.steps)}))

    def reset(self, step: str) -> None:
        if step in self.steps:
            self.steps[step] = StepState()
            self.mark(step, "pending")


# ---- what a work folder holds ---------------------------------------------------------------------


def is_work_folder(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in (MEASUREMENT, SETTINGS, STATE, "out"))


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


def published_records(work: Path) -> dict[str, Path]:
    """recipe.json and measurement.provenance.json as `main` publishes them, written into WORK/publish/:
    the source named by its Hub id when known, else its folder name (`quantkit.source.published_name`);
    no local path (`model_dir`, `source.path` and `source.how` stay in the work folder's own copies,
    which a rerun reads)."""
    from quantkit.source import published_name

    w = Work(work)
    settings = read_settings(work)
    prov = read_provenance(work)
    records: dict[str, Record] = {}
    name: str | None = None
    if settings is not None:
        name = (settings.source.hub_id if settings.source is not None else None) or published_name(
            settings.settings.model, settings.model_dir)
        source = settings.source.model_copy(update={"path": None, "how": None}) if settings.source is not None else None
        records[SETTINGS] = settings.model_copy(update={
            "settings": settings.settings.model_copy(update={"model": name}), "model_dir": None, "source": source})
    if prov is not None:
        records[PROVENANCE] = prov.model_copy(update={"model_ref": name or published_name(prov.model_ref)})
    out: dict[str, Path] = {}
    for file, record in records.items():
        path = w.publish / file
        text = record.model_dump_json(indent=2, exclude_none=True) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # unchanged: same mtime, no rehash
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
        out[file] = path
    return out


def source_model(work: Path) -> str | None:
    """The source model as the user named it (a Hub id or a path): the settings', else the measurement's."""
    settings = read_settings(work)
    if settings is not None:
        return settings.settings.model
    prov = read_provenance(work)
    return prov.model_ref if prov is not None else None
