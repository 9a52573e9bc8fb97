"""Publishing a work folder: `main` holds measurement.json, the README and the recipe/provenance; each
WORK/out/<branch> goes to its own branch cut from the repo's FIRST commit (so it does not inherit
main's files), carrying the README too.

One engine, two targets (`quantkit.targets`): the Hub through the HfApi seam, or a local git
repository. Per branch it compares what is there with what should be (size, then sha256 for LFS files
or the git blob id), commits only the difference in one commit, then lists the branch again and checks
it holds exactly the expected files. So a second run makes no commit, an interrupted run finishes only
what is missing, and a commit that silently changed nothing is caught. Files quantkit did not write
(their last commit's title does not start with "quantkit") are never overwritten without `force`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.errors import BranchVerifyFailed, ForeignFiles, WorkFolderIncomplete
from quantkit.files import write_text_atomic
from quantkit.guards import check_branch_name
from quantkit.targets import RemoteFile, RetryableError, Target
from quantkit.workfolder import MEASUREMENT, PROVENANCE, RECIPE, STATE, converted_branches, pick, read_json, update_state

COMMIT_PREFIX = "quantkit"  # every commit quantkit makes starts with it: how it knows its own files
CARD_NAME = "README.md"
MAIN_FILES = (MEASUREMENT, PROVENANCE, RECIPE)  # the recipe and provenance travel with the measurement
MAX_ATTEMPTS = 6


class BranchResult(BaseModel):
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
        if key not in self._cache:
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


def sync_branch(target: Target, branch: str, files: dict[str, Path], *, message: str, force: bool = False,
                hashes: FileHashes | None = None, sleep: Callable[[float], None] | None = None) -> BranchResult:
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
            commit = target.commit(branch, {p: files[p] for p in adds}, deletes, message)
            committed = True
            break
        except RetryableError as exc:
            if attempt == MAX_ATTEMPTS - 1:
                raise exc.final(MAX_ATTEMPTS) from exc
            sleep(_backoff(attempt, exc.retry_after))
    verify_branch(target, branch, files, base, hashes)
    return BranchResult(branch=branch, committed=committed, commit=commit, uploaded=sorted(adds) if committed else [],
                        deleted=deletes if committed else [], files=len(files),
                        bytes=sum(p.stat().st_size for p in files.values()))


def verify_branch(target: Target, branch: str, files: dict[str, Path], base: dict[str, RemoteFile], hashes: FileHashes) -> None:
    remote = target.list_files(branch)
    missing = sorted(p for p, local in files.items() if p not in remote or not hashes.same(local, remote[p]))
    unexpected = sorted(p for p in remote if p not in files and p not in base)
    if missing or unexpected:
        raise BranchVerifyFailed(target.id, branch, missing, unexpected)


def _record(work: Path, branch: str, target: Target, result: BranchResult) -> None:
    def change(state: dict) -> None:
        entry = state.setdefault("published", {}).setdefault(branch, {})
        previous = entry.get(target.id, {})
        entry[target.id] = {
            "commit": result.commit or previous.get("commit"),
            "files": result.files,
            "bytes": result.bytes,
            "verified": True,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    update_state(work, change)


def _bits_label(work: Path, branch: str) -> str:
    from quantkit.workfolder import BRANCH_PROVENANCE

    bits = pick(read_json(work / "out" / branch / BRANCH_PROVENANCE), "bits")
    return f" ({bits:g} bpw)" if isinstance(bits, (int, float)) else ""


def publish_main(work: Path, target: Target, card: Path, *, force: bool = False, hashes: FileHashes | None = None) -> BranchResult:
    result = sync_branch(target, "main", main_files(work, card), message=f"{COMMIT_PREFIX}: measurement.json, README and recipe",
                         force=force, hashes=hashes)
    _record(work, "main", target, result)
    return result


def publish_branch(work: Path, branch: str, target: Target, *, card: Path | None = None, force: bool = False,
                   hashes: FileHashes | None = None) -> BranchResult:
    """Publish WORK/out/<branch> to its own branch of `target` and record it in WORK/state.json.

    Safe to call from a worker thread while the next branch converts (issue 4's run); `target` must be
    prepared (`target.prepare()`), and the card defaults to WORK/publish/README.md (`write_card`).
    """
    card = card or work / "publish" / CARD_NAME
    if not card.is_file():
        raise WorkFolderIncomplete(work, f"no card at {card}", "run `quantkit publish` (it writes the card) or `quantkit card WORK --output FILE`")
    try:
        result = sync_branch(target, branch, branch_files(work, branch, card),
                             message=f"{COMMIT_PREFIX}: branch {branch}{_bits_label(work, branch)}", force=force, hashes=hashes)
    except Exception as exc:
        _record_failure(work, branch, target, exc)
        raise
    _record(work, branch, target, result)
    return result


def _record_failure(work: Path, branch: str, target: Target, exc: BaseException) -> None:
    """The branch is not (fully) published on `target`: say so in state.json, keeping its last commit."""

    def change(state: dict) -> None:
        entry = state.setdefault("published", {}).setdefault(branch, {})
        previous = entry.get(target.id, {})
        entry[target.id] = {"commit": previous.get("commit"), "verified": False,
                            "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    update_state(work, change)


def published(work: Path, branch: str, target_id: str) -> dict | None:
    """What WORK/state.json records of `branch` on the target, or None when it was never tried."""
    record = pick(read_json(work / STATE), f"published.{branch}", default={}) or {}
    return record.get(target_id)


def write_card(work: Path, repo: str | None, *, prompt_format: str | None = None) -> Path:
    """Render the card for `repo` into WORK/publish/README.md (rewritten only when it changed); without
    a repo the card names a placeholder USER/<model>-exl2."""
    from quantkit.card import card_spec, parse_card, render_card

    text = render_card(card_spec(work, repo=repo, override_format=prompt_format))
    parse_card(text)
    path = work / "publish" / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        write_text_atomic(path, text)
    return path


def publish(work: Path, target: Target, *, repo: str, force: bool = False, prompt_format: str | None = None,
            progress: Callable[[str], None] | None = None) -> list[BranchResult]:
    """Publish main, then every converted branch. Call `target.preflight(...)` first for the Hub."""
    say = progress or (lambda _m: None)
    branches = converted_branches(work)
    if not branches:
        raise WorkFolderIncomplete(work, "no converted branch in out/", f"run `quantkit convert MODEL --work {work}` first")
    for b in branches:
        check_branch_name(b)
    card = write_card(work, repo, prompt_format=prompt_format)
    target.prepare()
    hashes = FileHashes()
    results = [publish_main(work, target, card, force=force, hashes=hashes)]
    say(said(results[-1], target))
    for b in branches:
        results.append(publish_branch(work, b, target, card=card, force=force, hashes=hashes))
        say(said(results[-1], target))
    return results


def said(r: BranchResult, target: Target) -> str:
    """One line saying what publishing a branch did."""
    if not r.committed:
        return f"{r.branch}: up to date on {target.id} ({r.files} files), no commit"
    what = f"{len(r.uploaded)} uploaded" + (f", {len(r.deleted)} deleted" if r.deleted else "")
    return f"{r.branch}: committed {str(r.commit)[:10]} to {target.id} ({what}), verified {r.files} files"


def upload_bytes(work: Path, card: Path) -> int:
    """Everything a full publish uploads (main plus every branch), for the private-storage check."""
    files = list(main_files(work, card).values())
    for b in converted_branches(work):
        files += list(branch_files(work, b, card).values())
    return sum(p.stat().st_size for p in files)


# ---- where to publish ------------------------------------------------------------------------------


class TargetChoice(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    target: Target
    warnings: list[str]  # to say on screen: the local default instead of the Hub, --private ignored


def choose_target(work: Path, *, repo: str | None, to: Path | None = None, private: bool = False) -> TargetChoice:
    """The Hub repo when a token is configured, else the local git repository `to` or WORK/hub-repo.

    Shared by `quantkit publish` and `quantkit run`. Raises InvalidRepoId, HubOffline.
    """
    from quantkit import hub
    from quantkit.git_target import GitTarget
    from quantkit.targets import HubTarget, check_repo_id

    if repo is not None:
        check_repo_id(repo)
    warnings: list[str] = []
    target: Target
    if to is not None:
        target = GitTarget(to)
    elif repo is not None and hub.token():
        hub.ensure_reachable(repo)
        target = HubTarget(repo, private=private)
    else:
        to = work / "hub-repo"
        target = GitTarget(to)
        why = "no Hugging Face token configured" if repo is not None else "no Hub repo named"
        warnings.append(f"{why}: publishing into the local git repository {to} instead "
                        f"(inspect it with `git -C {to} log --all`; log in with `hf auth login` and rerun to publish to the Hub)")
    if private and isinstance(target, GitTarget):
        warnings.append("private applies to the Hub only; the local repository is yours alone")
    return TargetChoice(target=target, warnings=warnings)
