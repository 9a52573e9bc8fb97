"""Typed exceptions raised by quantkit's core.

Each carries the facts of the problem; the one table that turns them into a one-line message with a
remedy lives at the CLI edge (`quantkit.cli.errors`). The core never formats for a terminal.
"""

from __future__ import annotations

from pathlib import Path


class QuantkitError(Exception):
    """Base of every error quantkit expects and explains."""

    def __reduce__(self) -> tuple[object, ...]:
        # Errors raised in a Ray task travel back to the driver pickled; the default reduction calls
        # __init__ with the message alone, which these constructors do not take.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[QuantkitError], args: tuple[object, ...], state: dict[str, object]) -> QuantkitError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class ConfigMissing(QuantkitError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"no config.json in {path}")
        self.path = path


class ConfigUnreadable(QuantkitError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MissingConfigKey(QuantkitError):
    def __init__(self, arch: str, field: str, aliases: list[str]) -> None:
        super().__init__(f"{arch}: config.json has none of {aliases}")
        self.arch = arch
        self.field = field
        self.aliases = aliases


class UnsupportedArchitecture(QuantkitError):
    def __init__(self, arch: str, reason: str) -> None:
        super().__init__(f"{arch}: {reason}")
        self.arch = arch
        self.reason = reason


class InvalidBits(QuantkitError):
    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"bits {value!r}: {reason}")
        self.value = value
        self.reason = reason


class InvalidHeadBits(QuantkitError):
    def __init__(self, value: str) -> None:
        super().__init__(f"head bits {value!r}")
        self.value = value


class InvalidContext(QuantkitError):
    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"context {value!r}: {reason}")
        self.value = value
        self.reason = reason


class UnknownCacheMode(QuantkitError):
    def __init__(self, value: str, known: list[str]) -> None:
        super().__init__(f"cache mode {value!r}")
        self.value = value
        self.known = known


class InvalidSize(QuantkitError):
    def __init__(self, value: str) -> None:
        super().__init__(f"size {value!r}")
        self.value = value


class HubOffline(QuantkitError):
    def __init__(self, repo_id: str) -> None:
        super().__init__(f"{repo_id}: the Hugging Face Hub cannot be reached")
        self.repo_id = repo_id


class HubRepoNotFound(QuantkitError):
    def __init__(self, repo_id: str, detail: str = "") -> None:
        super().__init__(f"{repo_id}: not found on the Hub {detail}".strip())
        self.repo_id = repo_id
        self.detail = detail


class ModelNotFound(QuantkitError):
    def __init__(self, ref: str) -> None:
        super().__init__(f"{ref}: neither a folder nor a Hub repo id")
        self.ref = ref


class CorruptSafetensors(QuantkitError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---- issue 6: architecture adapters -------------------------------------------------------------------


class AdapterRefused(UnsupportedArchitecture):
    """The adapter for this architecture cannot map one feature of this config exactly."""

    def __init__(self, arch: str, feature: str, reason: str) -> None:
        super().__init__(arch, f"{feature}: {reason}")
        self.feature = feature
        self.detail = reason


class AdapterCheckpointMismatch(QuantkitError):
    """The checkpoint's tensors are not the ones the config and the adapter expect."""

    def __init__(self, arch: str, reason: str) -> None:
        super().__init__(f"{arch}: {reason}")
        self.arch = arch
        self.reason = reason


class AdapterTargetInvalid(QuantkitError):
    """The working copy's folder would overlap the user's model folder, or holds something else."""

    def __init__(self, src: Path, dst: Path, reason: str) -> None:
        super().__init__(f"{dst}: {reason}")
        self.src = src
        self.dst = dst
        self.reason = reason


class NoWeights(QuantkitError):
    def __init__(self, path: Path, looked_for: str = "*.safetensors and pytorch_model*.bin") -> None:
        super().__init__(f"no weights ({looked_for}) in {path}")
        self.path = path
        self.looked_for = looked_for


class MissingExtra(QuantkitError):
    """An optional dependency is needed for this step."""

    def __init__(self, package: str, purpose: str) -> None:
        super().__init__(f"{package} is needed to {purpose}")
        self.package = package
        self.purpose = purpose
# ---- issue 5: the model card and publishing ------------------------------------------------------------


class UnknownPromptFormat(QuantkitError):
    def __init__(self, value: str, known: list[str]) -> None:
        super().__init__(f"prompt format {value!r}")
        self.value = value
        self.known = known


class WorkFolderIncomplete(QuantkitError):
    def __init__(self, work: Path, missing: str, remedy: str) -> None:
        super().__init__(f"{work}: {missing}")
        self.work = work
        self.missing = missing
        self.remedy = remedy


class InvalidRepoId(QuantkitError):
    def __init__(self, repo_id: str, reason: str) -> None:
        super().__init__(f"repo id {repo_id!r}: {reason}")
        self.repo_id = repo_id
        self.reason = reason


class InvalidBranchName(QuantkitError):
    def __init__(self, name: str) -> None:
        super().__init__(f"branch name {name!r}")
        self.name = name


class NoHubToken(QuantkitError):
    def __init__(self) -> None:
        super().__init__("no Hugging Face token")


class TokenCannotWrite(QuantkitError):
    def __init__(self, namespace: str, user: str, reason: str) -> None:
        super().__init__(f"{user} cannot write to {namespace}: {reason}")
        self.namespace = namespace
        self.user = user
        self.reason = reason


class HubRequestFailed(QuantkitError):
    def __init__(self, action: str, status: int | None, reason: str, attempts: int = 1) -> None:
        super().__init__(f"{action}: HTTP {status}: {reason}")
        self.action = action
        self.status = status
        self.reason = reason
        self.attempts = attempts


class ForeignFiles(QuantkitError):
    def __init__(self, target: str, branch: str, files: list[str]) -> None:
        super().__init__(f"{target}@{branch}: files quantkit did not write: {files}")
        self.target = target
        self.branch = branch
        self.files = files


class BranchVerifyFailed(QuantkitError):
    def __init__(self, target: str, branch: str, missing: list[str], unexpected: list[str]) -> None:
        super().__init__(f"{target}@{branch}: missing {missing}, unexpected {unexpected}")
        self.target = target
        self.branch = branch
        self.missing = missing
        self.unexpected = unexpected


class PrivateStorageExceeded(QuantkitError):
    def __init__(self, needed: int, quota: int, plan: str) -> None:
        super().__init__(f"{needed} bytes exceed the {plan} private storage of {quota} bytes")
        self.needed = needed
        self.quota = quota
        self.plan = plan


class GitFailed(QuantkitError):
    def __init__(self, args: list[str], reason: str) -> None:
        super().__init__(f"git {' '.join(args)}: {reason}")
        self.args_ = args
        self.reason = reason


class LocalTargetDirty(QuantkitError):
    def __init__(self, path: Path, files: list[str]) -> None:
        super().__init__(f"{path}: uncommitted changes {files}")
        self.path = path
        self.files = files


class CardInvalid(QuantkitError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"model card: {reason}")
        self.reason = reason


# ---- issue 4: calibration sets, measurement, conversion, resumable runs ------------------------------


class ConverterMissing(QuantkitError):
    def __init__(self, detail: str) -> None:
        super().__init__(f"exllamav2's converter cannot start: {detail}")
        self.detail = detail


class NoCudaDevice(QuantkitError):
    def __init__(self, detail: str) -> None:
        super().__init__(f"no CUDA device: {detail}")
        self.detail = detail


class ConverterFailed(QuantkitError):
    """The converter ended without a finished job and its files. The work folder is kept for resume."""

    def __init__(self, task: str, stage: str, reason: str, exit_code: int | None, last_error: str, log: Path) -> None:
        super().__init__(f"{task} stopped at {stage}: {reason}")
        self.task = task
        self.stage = stage
        self.reason = reason
        self.exit_code = exit_code
        self.last_error = last_error
        self.log = log


class ConverterCancelled(QuantkitError):
    def __init__(self, task: str, stage: str, log: Path) -> None:
        super().__init__(f"{task} cancelled at {stage}")
        self.task = task
        self.stage = stage
        self.log = log


class JobMismatch(QuantkitError):
    """A converter work folder holds a job with other settings: exllamav2 would silently resume *its*."""

    def __init__(self, folder: Path, field: str, found: object, wanted: object) -> None:
        super().__init__(f"{folder}: job has {field}={found!r}, wanted {wanted!r}")
        self.folder = folder
        self.field = field
        self.found = found
        self.wanted = wanted


class WorkFolderMismatch(QuantkitError):
    def __init__(self, work: Path, recorded: str, model: str) -> None:
        super().__init__(f"{work} holds work for {recorded}, not {model}")
        self.work = work
        self.recorded = recorded
        self.model = model


class MeasurementMissing(QuantkitError):
    def __init__(self, work: Path) -> None:
        super().__init__(f"no measurement in {work}")
        self.work = work


class MeasurementCorrupt(QuantkitError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MeasurementMismatch(QuantkitError):
    def __init__(self, path: Path, field: str, recorded: object, current: object) -> None:
        super().__init__(f"{path}: {field} {recorded!r} != {current!r}")
        self.path = path
        self.field = field
        self.recorded = recorded
        self.current = current


class UnreachableBits(QuantkitError):
    def __init__(self, bits: float, low: float, high: float) -> None:
        super().__init__(f"{bits} bpw outside {low:.3f}..{high:.3f}")
        self.bits = bits
        self.low = low
        self.high = high


class CalibrationError(QuantkitError):
    """Base of the calibration-set refusals."""


class CalibrationSourceMissing(CalibrationError):
    def __init__(self, source: str) -> None:
        super().__init__(f"{source}: not found")
        self.source = source


class CalibrationUnreadable(CalibrationError):
    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NoTextColumn(CalibrationError):
    def __init__(self, source: str, wanted: str, columns: list[str]) -> None:
        super().__init__(f"{source}: no column {wanted!r} among {columns}")
        self.source = source
        self.wanted = wanted
        self.columns = columns


class NotEnoughText(CalibrationError):
    def __init__(self, source: str, tokens: int, rows: int, length: int) -> None:
        super().__init__(f"{source}: {tokens} tokens < {rows} x {length}")
        self.source = source
        self.tokens = tokens
        self.rows = rows
        self.length = length


class InvalidCount(QuantkitError):
    def __init__(self, name: str, value: object) -> None:
        super().__init__(f"{name} {value!r}")
        self.name = name
        self.value = value


class UnknownCalibration(CalibrationError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"calibration {name!r}")
        self.name = name
        self.known = known


class TokenizerMissing(QuantkitError):
    def __init__(self, folder: Path, what: str) -> None:
        super().__init__(f"{folder}: no {what}")
        self.folder = folder
        self.what = what


class DiskTooSmall(QuantkitError):
    def __init__(self, path: Path, needed: int, free: int) -> None:
        super().__init__(f"{path}: needs {needed} bytes, {free} free")
        self.path = path
        self.needed = needed
        self.free = free


class SettingsLocked(QuantkitError):
    def __init__(self, field: str, recorded: object, new: object) -> None:
        super().__init__(f"{field}: {recorded!r} -> {new!r}")
        self.field = field
        self.recorded = recorded
        self.new = new


class RecipeUnreadable(QuantkitError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---- issue 5 item 4: publishing inside `quantkit run` ---------------------------------------------


class PublishFailed(QuantkitError):
    """A branch's upload failed in the run's background worker; `cause` is the publisher's error."""

    def __init__(self, branch: str, target: str, cause: BaseException) -> None:
        super().__init__(f"{target}@{branch}: {cause}")
        self.branch = branch
        self.target = target
        self.cause = cause


# ---- several GPUs, and a Ray cluster -----------------------------------------------------------------


class NoSuchGpu(QuantkitError):
    """`--gpus` names a GPU this machine does not show (`visible`: the ids it does)."""

    def __init__(self, gpu: str, visible: list[str]) -> None:
        super().__init__(f"no GPU {gpu!r} (visible: {', '.join(visible) or 'none'})")
        self.gpu = gpu
        self.visible = visible


class ClusterUnreachable(QuantkitError):
    """The Ray cluster at `address` did not answer."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason


class ClusterTasksFailed(QuantkitError):
    """Some cluster tasks failed after the others finished; `failures` maps task to its error."""

    def __init__(self, failures: dict[str, BaseException]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in failures.items()))
        self.failures = failures
