"""Typed exceptions raised by quantkit's core, grouped by the stage that raises them.

Each error is a small dataclass: its fields carry the facts of the problem and `summary` says them in
one plain line (what `str(exc)` returns, for logs and state files). The one table that turns an error
into a message with a remedy lives at the CLI edge (`quantkit.cli.errors`); the core never formats for
a terminal. Catch a whole stage with its base (`except PublishError`).

Stages, in the order data flows: options -> model and architectures -> calibration -> converter
(measure, convert) -> work folder (the run's state machine) -> publish.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from typing_extensions import dataclass_transform


def _rebuild(cls: type[QuantkitError], state: dict[str, Any]) -> QuantkitError:
    exc = cls.__new__(cls)
    exc.__dict__.update(state)
    return exc


@dataclass_transform(eq_default=False)
class QuantkitError(Exception):
    """Base of every error quantkit expects and explains.

    Subclasses become dataclasses on definition: declare the fields and a `summary` template.
    """

    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # eq=False keeps exceptions hashable and compared by identity, as Python's own are.
        dataclasses.dataclass(eq=False)(cls)

    def __str__(self) -> str:
        return self.summary.format_map(vars(self)).strip()

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args) by default, which a dataclass __init__ need not accept; errors
        # cross process boundaries (the run's workers), so rebuild from the fields instead.
        return _rebuild, (type(self), dict(vars(self)))


# ---- options: values given on the command line or in a recipe -----------------------------------


class OptionError(QuantkitError):
    """A value given on the command line or in a recipe does not parse or is out of range."""


class InvalidBits(OptionError):
    """A bits-per-weight value does not parse or is out of range."""

    summary = "bits {value!r}: {reason}"
    value: str
    reason: str


class InvalidHeadBits(OptionError):
    """The lm_head bits are not one exllamav2 offers."""

    summary = "head bits {value!r}"
    value: str


class InvalidContext(OptionError):
    """A context length does not parse or is out of range."""

    summary = "context {value!r}: {reason}"
    value: str
    reason: str


class UnknownCacheMode(OptionError):
    """A KV cache mode exllamav2 does not have."""

    summary = "cache mode {value!r}"
    value: str
    known: list[str]


class InvalidSize(OptionError):
    """A GPU size that does not parse."""

    summary = "size {value!r}"
    value: str


class UnknownLoader(OptionError):
    """A way of loading the model the planner does not model."""

    summary = "loader {value!r}"
    value: str
    known: list[str]


class InvalidHeadroom(OptionError):
    """A --headroom that does not parse or leaves nothing of the card."""

    summary = "headroom {value!r}: {reason}"
    value: str
    reason: str


class InvalidCount(OptionError):
    """A count (rows, length, ...) that is not a positive whole number."""

    summary = "{name} {value!r}"
    name: str
    value: object


class UnknownPromptFormat(OptionError):
    """A prompt format that is neither a known name nor a format with {prompt}."""

    summary = "prompt format {value!r}"
    value: str
    known: list[str]


class RecipeUnreadable(OptionError):
    """A recipe file that cannot be read or does not validate."""

    summary = "{path}: {reason}"
    path: Path
    reason: str


class MissingExtra(OptionError):
    """An optional dependency is needed for this step."""

    summary = "{package} is needed to {purpose}"
    package: str
    purpose: str


class NoSuchGpu(OptionError):
    """`--gpus` names a GPU this machine does not show (`visible`: the ids it does)."""

    summary = "no GPU {gpu!r} (visible: {visible})"
    gpu: str
    visible: list[str]


class ClusterUnreachable(OptionError):
    """The Ray cluster at `address` (`--cluster`) did not answer."""

    summary = "{address}: {reason}"
    address: str
    reason: str


class InvalidBranchName(OptionError):
    """A branch name that is unsafe as a folder under WORK or as a Hub/git branch."""

    summary = "branch name {name!r}"
    name: str
    source: str | None = None  # the recipe or branch-set file that named it; None for flags


class DuplicateBranchName(OptionError):
    """Two branches with one name would share one folder and one Hub branch."""

    summary = "branch name {name!r} given twice"
    name: str
    source: str | None = None


class RecipeUnknownKey(OptionError):
    """A key no reader knows: a typo would otherwise be ignored (`head_bit = 6`)."""

    summary = "{path}: unknown key {key!r} in {table}"
    path: Path
    key: str
    table: str
    known: list[str]


class PathOverlapsModel(OptionError):
    """A path quantkit would write is the source model folder, lies inside it, or holds it."""

    summary = "{what} {path} overlaps the model folder {model_dir}"
    what: str
    path: Path
    model_dir: Path


class PathOverlapsWork(OptionError):
    """A path given for something else is the work folder, or a folder quantkit fills inside it."""

    summary = "{what} {path} overlaps the work folder {work}"
    what: str
    path: Path
    work: Path


class PathLeavesWork(OptionError):
    """A folder quantkit fills under WORK resolves outside it (a symlink on the way)."""

    summary = "{what} {path} is outside the work folder {work}"
    what: str
    path: Path
    work: Path


class OutputPathInvalid(OptionError):
    """An output path that cannot be written: a file on its way, or a folder in its place."""

    summary = "{path}: {reason}"
    path: Path
    reason: str


# ---- model and architectures: config.json, safetensors, the Hub, the adapters -------------------------


class ModelError(QuantkitError):
    """The source model cannot be found, read or mapped onto exllamav2."""


class ModelNotFound(ModelError):
    """Neither a folder nor a Hub repo id."""

    summary = "{ref}: neither a folder nor a Hub repo id"
    ref: str


class ConfigMissing(ModelError):
    """The model folder has no config.json."""

    summary = "no config.json in {path}"
    path: Path


class ConfigUnreadable(ModelError):
    """A JSON or TOML file that cannot be read or parsed."""

    summary = "{path}: {reason}"
    path: Path
    reason: str


class MissingConfigKey(ModelError):
    """config.json has none of the names a required field goes by."""

    summary = "{arch}: config.json has none of {aliases}"
    arch: str
    field: str
    aliases: list[str]


class UnsupportedArchitecture(ModelError):
    """An architecture exllamav2 cannot quantize (it would silently treat it as Llama)."""

    summary = "{arch}: {reason}"
    arch: str
    reason: str


class AdapterRefused(UnsupportedArchitecture):
    """The adapter for this architecture cannot map one feature of this config exactly."""

    feature: str = ""
    detail: str = ""

    def __init__(self, arch: str, feature: str, reason: str) -> None:
        super().__init__(arch, f"{feature}: {reason}")
        self.feature = feature
        self.detail = reason


class AdapterCheckpointMismatch(ModelError):
    """The checkpoint's tensors are not the ones the config and the adapter expect."""

    summary = "{arch}: {reason}"
    arch: str
    reason: str


class AdapterTargetInvalid(ModelError):
    """The working copy's folder would overlap the user's model folder, or holds something else."""

    summary = "{dst}: {reason}"
    src: Path
    dst: Path
    reason: str


class HubOffline(ModelError):
    """The Hub cannot be reached (offline, or HF_HUB_OFFLINE is set)."""

    summary = "{repo_id}: the Hugging Face Hub cannot be reached"
    repo_id: str


class HubRepoNotFound(ModelError):
    """The Hub has no such repo, or it is private."""

    summary = "{repo_id}: not found on the Hub {detail}"
    repo_id: str
    detail: str = ""


class InvalidModelShape(ModelError):
    """A config.json field no real model has (0 layers, a 10^12 vocabulary, heads that do not divide)."""

    summary = "{arch}: {field} = {value!r}: {reason}"
    arch: str
    field: str
    value: object
    reason: str


class HubRevisionNotFound(ModelError):
    """A Hub repo has no such branch, tag or commit."""

    summary = "{repo_id}: no branch or revision {revision!r}"
    repo_id: str
    revision: str
    known: list[str]


class NotExl2Branch(ModelError):
    """USER/REPO:BRANCH names a branch holding no converted EXL2 model."""

    summary = "{repo_id}:{revision}: {reason}"
    repo_id: str
    revision: str
    reason: str


class CorruptSafetensors(ModelError):
    """A shard whose header is truncated or not safetensors."""

    summary = "{path}: {reason}"
    path: str
    reason: str


class NoWeights(ModelError):
    """The model folder holds no weight files."""

    summary = "no weights ({looked_for}) in {path}"
    path: Path
    looked_for: str = "*.safetensors and pytorch_model*.bin"


class TokenizerMissing(ModelError):
    """The model folder lacks a tokenizer file a step needs."""

    summary = "{folder}: no {what}"
    folder: Path
    what: str


# ---- calibration sets ---------------------------------------------------------------------------------


class CalibrationError(QuantkitError):
    """A calibration set cannot be built from its source."""


class UnknownCalibration(CalibrationError):
    """No calibration recipe or file by that name."""

    summary = "calibration {name!r}"
    name: str
    known: list[str]


class CalibrationSourceMissing(CalibrationError):
    """The calibration source does not exist."""

    summary = "{source}: not found"
    source: str


class CalibrationUnreadable(CalibrationError):
    """The calibration source cannot be read in any format quantkit knows."""

    summary = "{source}: {reason}"
    source: str
    reason: str


class NoTextColumn(CalibrationError):
    """The calibration source has no column to take text from."""

    summary = "{source}: no column {wanted!r} among {columns}"
    source: str
    wanted: str
    columns: list[str]


class NotEnoughText(CalibrationError):
    """The source holds fewer tokens than rows x length."""

    summary = "{source}: {tokens} tokens < {rows} x {length}"
    source: str
    tokens: int
    rows: int
    length: int


# ---- the converter: exllamav2's measure and convert ------------------------------------------------


class ConverterError(QuantkitError):
    """exllamav2's converter cannot run, failed, or its measurement does not fit."""


class ConverterMissing(ConverterError):
    """exllamav2's convert.py cannot start."""

    summary = "exllamav2's converter cannot start: {detail}"
    detail: str


class NoCudaDevice(ConverterError):
    """The converter needs an NVIDIA GPU."""

    summary = "no CUDA device: {detail}"
    detail: str


class ConverterFailed(ConverterError):
    """The converter ended without a finished job and its files. The work folder is kept for resume."""

    summary = "{task} stopped at {stage}: {reason}"
    task: str
    stage: str
    reason: str
    exit_code: int | None
    last_error: str
    log: Path


class ConverterCancelled(ConverterError):
    """The converter was interrupted; the work folder is kept for resume."""

    summary = "{task} cancelled at {stage}"
    task: str
    stage: str
    log: Path


class JobMismatch(ConverterError):
    """A converter work folder holds a job with other settings: exllamav2 would silently resume *its*."""

    summary = "{folder}: job has {field}={found!r}, wanted {wanted!r}"
    folder: Path
    field: str
    found: object
    wanted: object


class MeasurementCorrupt(ConverterError):
    """measurement.json cannot be read."""

    summary = "{path}: {reason}"
    path: Path
    reason: str


class MeasurementMismatch(ConverterError):
    """The measurement was made for another model or settings."""

    summary = "{path}: {field} {recorded!r} != {current!r}"
    path: Path
    field: str
    recorded: object
    current: object


class UnreachableBits(ConverterError):
    """A bitrate outside what this measurement can reach."""

    summary = "{bits} bpw outside {low:.3f}..{high:.3f}"
    bits: float
    low: float
    high: float


# ---- the work folder: the run's file-backed state -------------------------------------------------


class WorkFolderError(QuantkitError):
    """The work folder does not hold what this step needs, or belongs to other work."""


class WorkFolderMismatch(WorkFolderError):
    """The work folder holds work for another model."""

    summary = "{work} holds work for {recorded}, not {model}"
    work: Path
    recorded: str
    model: str


class WorkFolderIncompatible(WorkFolderError):
    """A work folder file of another format version than this quantkit reads."""

    summary = "{path}: format {found}, this quantkit reads format {supported}"
    path: Path
    found: object
    supported: int


class WorkFolderCorrupt(WorkFolderError):
    """A work folder file that is not the record quantkit writes there."""

    summary = "{path}: {reason}"
    path: Path
    reason: str


class WorkFolderIncomplete(WorkFolderError):
    """A step needs a file an earlier step has not written yet."""

    summary = "{work}: {missing}"
    work: Path
    missing: str
    remedy: str


class MeasurementMissing(WorkFolderError):
    """No finished measurement in the work folder."""

    summary = "no measurement in {work}"
    work: Path


class SettingsLocked(WorkFolderError):
    """A setting changed that would invalidate finished work."""

    summary = "{field}: {recorded!r} -> {new!r}"
    field: str
    recorded: object
    new: object


class DiskTooSmall(WorkFolderError):
    """The work folder's disk cannot hold the plan."""

    summary = "{path}: needs {needed} bytes, {free} free"
    path: Path
    needed: int
    free: int


class ClusterTasksFailed(WorkFolderError):
    """Some cluster tasks failed; the others finished. `failures` maps each task to its error."""

    summary = "cluster tasks failed: {failures}"
    failures: dict[str, BaseException]


class WorkFolderBusy(WorkFolderError):
    """Another process holds the work folder's lock."""

    summary = "{work} is in use by PID {pid}: {command}"
    work: Path
    pid: int | None
    command: str | None


class WorkFolderNotWritable(WorkFolderError):
    """The work folder (or a file in it) cannot be written."""

    summary = "{path}: {reason}"
    path: Path
    reason: str


# ---- evaluation: each branch against the unquantized model ----------------------------------------


class EvalError(QuantkitError):
    """The evaluation of branches against the unquantized model (`quantkit eval`, the run's eval step)."""


class EvalTextTooShort(EvalError):
    """The evaluation text holds fewer tokens than rows x length."""

    summary = "evaluation text {source}: {tokens} tokens, fewer than {rows} x {length}"
    source: str
    tokens: int
    rows: int
    length: int


class EvalOverlapsCalibration(EvalError):
    """The evaluation text repeats the calibration set (word 13-grams)."""

    summary = "evaluation text {source} overlaps the calibration set {calibration} ({share:.0%})"
    source: str
    share: float
    calibration: Path


class NotAnExl2Branch(EvalError):
    """A branch folder that is not a converted EXL2 model."""

    summary = "{folder}: {reason}"
    folder: Path
    reason: str


class EvalReferenceFailed(EvalError):
    """The unquantized model's reference logits could not be computed: nothing can be compared."""

    summary = "reference logits of {model}: {reason}"
    model: str
    reason: str


# ---- publish: the card, the Hub and local git targets ---------------------------------------------


class PublishError(QuantkitError):
    """A branch cannot be published, or was not published as planned."""


class InvalidRepoId(PublishError):
    """A repo id that is not USER/NAME."""

    summary = "repo id {repo_id!r}: {reason}"
    repo_id: str
    reason: str
    option: str = "--repo"  # the option or recipe key that named it


class CardInvalid(PublishError):
    """The model card does not validate."""

    summary = "model card: {reason}"
    reason: str


class NoHubToken(PublishError):
    """No Hugging Face token to publish with."""

    summary = "no Hugging Face token to publish {repo}"
    repo: str = ""


class BaseModelUnknown(PublishError):
    """Publishing to the Hub, the source's Hub id (the card's base_model) is not known."""

    summary = "{source}: base_model unknown"
    source: str


class LocalTargetNotRepo(PublishError):
    """The local target is a non-empty folder that is not a git repository."""

    summary = "{path}: not empty and not a git repository ({found})"
    path: Path
    found: str


class TokenCannotWrite(PublishError):
    """The token's user cannot write to the target namespace."""

    summary = "{user} cannot write to {namespace}: {reason}"
    namespace: str
    user: str
    reason: str


class HubRequestFailed(PublishError):
    """A Hub request failed, after retries where retrying made sense."""

    summary = "{action}: HTTP {status}: {reason}"
    action: str
    status: int | None
    reason: str
    attempts: int = 1


class PrivateStorageExceeded(PublishError):
    """The upload would exceed the account's private storage."""

    summary = "{needed} bytes exceed the {plan} private storage of {quota} bytes"
    needed: int
    quota: int
    plan: str


class ForeignFiles(PublishError):
    """The target branch holds files quantkit did not write."""

    summary = "{target}@{branch}: files quantkit did not write: {files}"
    target: str
    branch: str
    files: list[str]


class BranchVerifyFailed(PublishError):
    """After the commit, the branch does not hold what was committed."""

    summary = "{target}@{branch}: missing {missing}, unexpected {unexpected}"
    target: str
    branch: str
    missing: list[str]
    unexpected: list[str]


class GitFailed(PublishError):
    """A git command on the local target failed."""

    args_: list[str]  # `args` is Exception's own attribute
    reason: str

    def __str__(self) -> str:
        return f"git {' '.join(self.args_)}: {self.reason}"


class LocalTargetDirty(PublishError):
    """The local git target has uncommitted changes."""

    summary = "{path}: uncommitted changes {files}"
    path: Path
    files: list[str]


class PublishFailed(PublishError):
    """A branch's upload failed in the run's background worker; `cause` is the publisher's error."""

    summary = "{target}@{branch}: {cause}"
    branch: str
    target: str
    cause: BaseException
