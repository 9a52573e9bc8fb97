"""Typed exceptions raised by quantkit's core.

Each carries the facts of the problem; the one table that turns them into a one-line message with a
remedy lives at the CLI edge (`quantkit.cli.errors`). The core never formats for a terminal.
"""

from __future__ import annotations

from pathlib import Path


class QuantkitError(Exception):
    """Base of every error quantkit expects and explains."""


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
    def __init__(self, path: Path) -> None:
        super().__init__(f"no *.safetensors or pytorch_model*.bin in {path}")
        self.path = path


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
