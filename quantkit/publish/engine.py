"""The publishing engine: `main` holds measurement.json, the README and the recipe/provenance; each
WORK/out/<branch> goes to its own branch cut from the repo's FIRST commit (so it does not inherit
main's files), carrying the README too.

One engine, two targets (`target.Target`): the Hub through the HfApi seam, or a local git
repository. Per branch it compares what is there with what should be (size, then sha256 for LFS files
or the git blob id), commits only the difference in one commit, then lists the branch again and checks
it holds exactly the expected files. So a second run makes no commit, an interrupted run finishes only
what is missing, and a commit that silently changed nothing is caught. Files quantkit did not write
(their last commit's title does not start with "quantkit") are never overwritten without `force`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit import eval as evaluation
from quantkit.errors import BranchVerifyFailed, ForeignFiles, WorkFolderIncomplete
from quantkit.guards import check_branch_name
from quantkit.publish.scrub import publishable
from quantkit.publish.target import RemoteFile, RetryableError, Target
from quantkit.workfolder import (
    MEASUREMENT,
    PROVENANCE,
    SETTINGS,
    PublishRecord,
    StateRecord,
    converted_branches,
    now,
    published_records,
    read_branch_provenance,
    read_state,
    update_state,
)

COMMIT_PREFIX = "quantkit"  # every commit quantkit makes starts with it: how it knows its own files
CARD_NAME = "README.md"
# the settings and provenance travel with the measurement; the evaluation's figures and chart once made
MAIN_FILES = (MEASUREMENT, PROVENANCE, SETTINGS, evaluation.REPORT_NAME, evaluation.CHART_NAME)
MAX_ATTEMPTS = 6
CACHE_MIN_BYTES = 1 << 20


class SyncResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    committed: bool
    commit: str | None
    uploaded: list[str]
    deleted: list[str]
    files: int
    bytes: int


# ---- local files -----------------------------------------------------------------------------------


class FileHashes:
    """sha256 (the Hub's LFS id) and git blob id (the Hub's and git's id of small files) of local files,
    computed in one pass and only when sizes agree; cached by (size, mtime) for the run."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], tuple[str, str]] = {}

    def of(self, path: Path) -> tuple[str, str]:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        # Small files (the card, rewritten as branches land) are hashed afresh: a rewrite within one
        # timestamp tick would otherwise look unchanged.
        if key not in self._cache or st.st_size < CACHE_MIN_BYTES:
            sha256 = hashlib.sha256()
            blob = hashlib.sha1(f"blob {st.st_size}\0".encode())  # noqa: S324 - git's object id, not security
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha256.update(chunk)
                    blob.update(chunk)
            self._cache[key] = (sha256.hexdigest(), blob.hexdigest())
        return self._cache[key]

    def same(self, local: Path, remote: RemoteFile) -> bool:
        if local.stat().st_size != remote.size:
            return False
        sha256, blob = self.of(local)
        if remote.sha256 is not None:
            return remote.sha256 == sha256
        return remote.blob_id == blob


def main_files(work: Path, card: Path) -> dict[str, Path]:
    if not (work / MEASUREMENT).is_file():
        raise WorkFolderIncomplete(work, "no measurement.json", "run `quantkit measure MODEL --work WORK` first")
    files = {name: work / name for name in MAIN_FILES if (work / name).is_file()}
    files |= published_records(work)  # recipe and provenance without the local source path
    files[CARD_NAME] = card
    return files


def branch_files(work: Path, branch: str, card: Path) -> dict[str, Path]:
    """Every file of WORK/out/<branch> (hidden ones aside), plus the card as README.md."""
    folder = work / "out" / branch
    if branch not in converted_branches(work):
        raise WorkFolderIncomplete(work, f"no conversion for branch {branch} in out/{branch}",
                                   f"run `quantkit convert MODEL --work {work}` first")
    files = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    files[CARD_NAME] = card
    return files


# ---- the engine ------------------------------------------------------------------------------------


def _backoff(attempt: int, retry_after: float | None) -> float:
    return retry_after if retry_after is not None else min(60.0, 2.0 * 2**attempt)


#: A commit's title from what it changes (added/updated paths, deleted paths); or a fixed title.
Message = str | Callable[[list[str], list[str]], str]


def sync_branch(target: Target, branch: str, files: dict[str, Path], *, message: Message, force: bool = False,
                hashes: FileHashes | None = None, sleep: Callable[[float], None] | None = None) -> SyncResult:
    """Make `branch` of `target` hold exactly `files` (plus the first commit's files), in at most one commit.

    The branch is created from the target's first commit when missing. A retryable failure (429, 5xx,
    a lost connection) re-plans from what the branch holds then, so a commit that landed before the
    error is not made twice.

    Raises:
        ForeignFiles: the branch holds files quantkit did not write that would change (unless `force`).
        BranchVerifyFailed: after the commit, the branch does not hold what was committed.
        HubRequestFailed, GitFailed: the target failed for good.
    """
    check_branch_name(branch)
    hashes = hashes or FileHashes()
    sleep = sleep or target.sleep
    first = target.first_commit()
    base = target.list_files(first)
    if branch not in target.branches():
        target.create_branch(branch, first)
    committed, commit, adds, deletes = False, None, [], []
    for attempt in range(MAX_ATTEMPTS):
        remote = target.list_files(branch)
        adds = [p for p, local in files.items() if p not in remote or not hashes.same(local, remote[p])]
        deletes = sorted(p for p in remote if p not in files and not (p in base and remote[p].blob_id == base[p].blob_id))
        foreign = sorted(p for p in adds + deletes if p in remote and not remote[p].by_quantkit)
        if foreign and not force:
            raise ForeignFiles(target.id, branch, foreign)
        if not adds and not deletes:
            break
        try:
            title = message if isinstance(message, str) else message(sorted(adds), deletes)
            commit = target.commit(branch, {p: files[p] for p in adds}, deletes, title)
            committed = True
            break
        except RetryableError as exc:
            if attempt == MAX_ATTEMPTS - 1:
                raise exc.final(MAX_ATTEMPTS) from exc
            sleep(_backoff(attempt, exc.retry_after))
    verify_branch(target, branch, files, base, hashes)
    return SyncResult(branch=branch, committed=committed, commit=commit, uploaded=sorted(adds) if committed else [],
                      deleted=deletes if committed else [], files=len(files),
                      bytes=sum(p.stat().st_size for p in files.values()))


def verify_branch(target: Target, branch: str, files: dict[str, Path], base: dict[str, RemoteFile], hashes: FileHashes) -> None:
    remote = target.list_files(branch)
    missing = sorted(p for p, local in files.items() if p not in remote or not hashes.same(local, remote[p]))
    unexpected = sorted(p for p in remote if p not in files and p not in base)
    if missing or unexpected:
        raise BranchVerifyFailed(target.id, branch, missing, unexpected)


def _record(work: Path, branch: str, target: Target, result: SyncResult) -> None:
    set_published(work, branch, target.id, lambda previous: PublishRecord(
        commit=result.commit or (previous.commit if previous else None), files=result.files, bytes=result.bytes,
        verified=True, at=now()))


def set_published(work: Path, branch: str, target_id: str, make: Callable[[PublishRecord | None], PublishRecord]) -> None:
    def change(state: StateRecord) -> StateRecord:
        on_branch = dict(state.published.get(branch, {}))
        on_branch[target_id] = make(on_branch.get(target_id))
        return state.model_copy(update={"published": state.published | {branch: on_branch}})

    update_state(work, change)


def _bits_label(work: Path, branch: str) -> str:
    prov = read_branch_provenance(work / "out" / branch)
    return f" ({prov.bits:g} bpw)" if prov is not None else ""


def publish_main(work: Path, target: Target, card: Path, *, force: bool = False, hashes: FileHashes | None = None,
                 message: Message | None = None) -> SyncResult:
    result = sync_branch(target, "main", publishable(work, "main", main_files(work, card)),
                         message=message or f"{COMMIT_PREFIX}: measurement.json, README and recipe", force=force, hashes=hashes)
    _record(work, "main", target, result)
    return result


def publish_branch(work: Path, branch: str, target: Target, *, card: Path, force: bool = False,
                   hashes: FileHashes | None = None, message: Message | None = None) -> SyncResult:
    """Publish WORK/out/<branch> to its own branch of `target` and record it in WORK/state.json.

    Safe to call from a worker thread while the next branch converts (in `quantkit run`); `target` must be
    prepared (`target.prepare()`).
    """
    try:
        result = sync_branch(target, branch, publishable(work, branch, branch_files(work, branch, card)),
                             message=message or f"{COMMIT_PREFIX}: branch {branch}{_bits_label(work, branch)}", force=force, hashes=hashes)
    except Exception as exc:
        _record_failure(work, branch, target, exc)
        raise
    _record(work, branch, target, result)
    return result


def _record_failure(work: Path, branch: str, target: Target, exc: BaseException) -> None:
    """The branch is not (fully) published on `target`: say so in state.json, keeping its last commit."""
    set_published(work, branch, target.id, lambda previous: PublishRecord(
        commit=previous.commit if previous else None, verified=False,
        error=f"{type(exc).__name__}: {exc}".splitlines()[0], at=now()))


def published(work: Path, branch: str, target_id: str) -> PublishRecord | None:
    """What WORK/state.json records of `branch` on the target, or None when it was never tried."""
    return read_state(work).published.get(branch, {}).get(target_id)


def said(r: SyncResult, target: Target) -> str:
    """One line saying what publishing a branch did."""
    if not r.committed:
        return f"{r.branch}: up to date on {target.id} ({r.files} files), no commit"
    what = f"{len(r.uploaded)} uploaded" + (f", {len(r.deleted)} deleted" if r.deleted else "")
    return f"{r.branch}: committed {str(r.commit)[:10]} to {target.id} ({what}), verified {r.files} files"
