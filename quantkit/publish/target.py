"""What the publishing engine needs of a destination: six operations, the file listing they return,
and the one error class that says "try again". The Hub (`hub_target`) and a local git repository
(`git_target`) implement it; tests add fakes with real commit semantics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import HubRequestFailed


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files on the Hub
    blob_id: str | None  # git blob id (small files on the Hub; every file in git)
    by_quantkit: bool  # its last commit's title starts with "quantkit"


class RetryableError(Exception):
    """A rate limit, server error or lost connection: worth another try after `retry_after` seconds."""

    def __init__(self, action: str, status: int | None, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"{action}: {status}: {reason}")
        self.action, self.status, self.reason, self.retry_after = action, status, reason, retry_after

    def final(self, attempts: int) -> HubRequestFailed:
        return HubRequestFailed(self.action, self.status, self.reason, attempts)


class Target:
    """What the publishing engine needs of a destination."""

    id: str
    sleep: Callable[[float], None] = staticmethod(time.sleep)  # type: ignore[assignment]

    def prepare(self) -> None: ...
    def first_commit(self) -> str: ...
    def branches(self) -> set[str]: ...
    def create_branch(self, branch: str, from_commit: str) -> None: ...
    def list_files(self, revision: str) -> dict[str, RemoteFile]: ...
    def commit(self, branch: str, adds: dict[str, Path], deletes: list[str], message: str) -> str: ...
