"""The Hugging Face Hub as a publish target, through the one HfApi seam (`quantkit.hub.get_hf_api`),
and the pre-flight that checks token, namespace, private storage, source and card before any write.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from quantkit import hub
from quantkit.errors import (
    CardInvalid,
    HubRequestFailed,
    InvalidRepoId,
    NoHubToken,
    PrivateStorageExceeded,
    TokenCannotWrite,
)
from quantkit.publish.target import RemoteFile, RetryableError, Target

T = TypeVar("T")

#: hub-docs storage-limits.md: private storage per account. PRO accounts and paid organisations get
#: more (1 TB, or per seat); the check is skipped for the latter, whose quota the API does not expose.
FREE_PRIVATE_BYTES = 100 * 10**9
PRO_PRIVATE_BYTES = 1000 * 10**9
WRITE_ROLES = {"admin", "write", "contributor"}


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:  # older huggingface_hub on httpx / requests
        pass
    return tuple(errors)


def classify(action: str, exc: BaseException) -> BaseException:
    """429, 5xx and lost connections become `RetryableError`; other HTTP errors `HubRequestFailed` at once."""
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        reason = exc.server_message or str(exc).splitlines()[0]
        if status == 429 or (status is not None and status >= 500):
            retry_after = None
            try:
                retry_after = float(response.headers.get("retry-after"))  # type: ignore[union-attr]
            except (TypeError, ValueError, AttributeError):
                pass
            return RetryableError(action, status, reason, retry_after)
        return HubRequestFailed(action, status, reason)
    if isinstance(exc, _transport_errors()):
        return RetryableError(action, None, f"connection lost ({type(exc).__name__}: {exc})")
    return exc


class HubTarget(Target):
    """A Hub model repo. Every call goes through `quantkit.hub.get_hf_api()`; reads are retried here,
    commits are retried by the engine (which re-plans first)."""

    def __init__(self, repo_id: str, *, private: bool = False, sleep: Callable[[float], None] | None = None,
                 max_attempts: int = 6) -> None:
        self.repo_id = check_repo_id(repo_id)
        self.id = f"hub:{repo_id}"
        self.private = private
        self.api = hub.get_hf_api()
        self.max_attempts = max_attempts
        if sleep is not None:
            self.sleep = sleep  # type: ignore[method-assign]
        self._first: str | None = None

    def _call(self, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.max_attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified just below
                err = classify(action, exc)
                if not isinstance(err, RetryableError):
                    if err is exc:
                        raise
                    raise err from exc
                if attempt == self.max_attempts - 1:
                    raise err.final(self.max_attempts) from exc
                self.sleep(err.retry_after if err.retry_after is not None else min(60.0, 2.0 * 2**attempt))
        raise AssertionError("unreachable")

    def prepare(self) -> None:
        # exist_ok=True also avoids a race with a concurrent create (huggingface_hub cli/upload.py).
        self._call("create_repo", self.api.create_repo, self.repo_id, private=self.private, exist_ok=True, repo_type="model")

    def first_commit(self) -> str:
        if self._first is None:
            commits = self._call("list_repo_commits", self.api.list_repo_commits, self.repo_id)
            self._first = commits[-1].commit_id  # newest first: the last is the repo's first commit
        return self._first

    def branches(self) -> set[str]:
        refs = self._call("list_repo_refs", self.api.list_repo_refs, self.repo_id)
        return {b.name for b in refs.branches}

    def create_branch(self, branch: str, from_commit: str) -> None:
        self._call("create_branch", self.api.create_branch, self.repo_id, branch=branch, revision=from_commit, exist_ok=True)

    def list_files(self, revision: str) -> dict[str, RemoteFile]:
        # expand=True brings each file's last commit, whose title says whether quantkit wrote it.
        def listing() -> list[Any]:
            return list(self.api.list_repo_tree(self.repo_id, revision=revision, recursive=True, expand=True))

        out = {}
        for f in self._call("list_repo_tree", listing):
            if not hasattr(f, "blob_id"):  # a RepoFolder
                continue
            title = (getattr(f.last_commit, "title", None) or "") if f.last_commit else ""
            out[f.path] = RemoteFile(path=f.path, size=f.size, sha256=f.lfs.sha256 if f.lfs else None,
                                     blob_id=None if f.lfs else f.blob_id, by_quantkit=title.startswith("quantkit"))
        return out

    def commit(self, branch: str, adds: dict[str, Path], deletes: list[str], message: str) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local)) for p, local in sorted(adds.items())]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
        try:
            info = self.api.create_commit(self.repo_id, operations=ops, commit_message=message, revision=branch, repo_type="model")
        except Exception as exc:  # noqa: BLE001 - classified: retryable ones go back to the engine
            err = classify("create_commit", exc)
            if err is exc:
                raise
            raise err from exc
        return info.oid

    # ---- pre-flight -------------------------------------------------------------------------------

    def preflight(self, *, upload_bytes: int, source: str | None, card_text: str) -> list[str]:
        """Check the token, the namespace, private storage, the source and the card before any write.

        Returns lines to show. Raises NoHubToken, TokenCannotWrite, PrivateStorageExceeded, CardInvalid.
        """
        lines = []
        if not self.api.token and not hub.token():
            raise NoHubToken(self.repo_id)
        try:
            me = self._call("whoami", self.api.whoami)
        except HubRequestFailed as exc:
            if exc.status == 401:
                raise TokenCannotWrite(self.repo_id.split("/")[0], "(unknown)", "the token is invalid or expired") from exc
            raise
        namespace = self.repo_id.split("/")[0]
        user = me.get("name", "?")
        check_write_access(me, namespace)
        lines.append(f"token: {user} can write to {namespace}")
        if self.private:
            quota, plan = private_quota(me, namespace)
            if quota is not None and upload_bytes > quota:
                raise PrivateStorageExceeded(upload_bytes, quota, plan)
            lines.append(f"private repo: {upload_bytes / 1e9:.1f} GB to upload" + (f" of {plan} {quota / 1e9:.0f} GB" if quota else ""))
        lines.append(self._source_line(source))
        try:
            hub.validate_card(card_text)
        except ValueError as exc:
            raise CardInvalid(str(exc).splitlines()[0]) from exc
        lines.append("card: the Hub validates its metadata")
        return lines

    def _source_line(self, source: str | None) -> str:
        if not source:
            return "source: not a Hub repo, gating unknown"
        try:
            info = self._call("model_info", self.api.model_info, source)
        except HubRequestFailed as exc:
            return f"source {source}: cannot be read ({exc.reason}); check its license before publishing quants"
        gated = getattr(info, "gated", False)
        return (f"source {source} is gated ({gated}): check that its license lets you redistribute quants"
                if gated else f"source {source} is not gated")


def check_repo_id(repo_id: str) -> str:
    if repo_id.count("/") != 1:
        raise InvalidRepoId(repo_id, "it must be exactly USER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidRepoId(repo_id, str(exc).splitlines()[0]) from exc
    return repo_id


def check_write_access(me: dict[str, Any], namespace: str) -> None:
    """whoami's answer: the token's role (or fine-grained scopes) and the user's role in the namespace."""
    user = me.get("name", "?")
    token = (me.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if namespace != user:
        orgs = {o.get("name"): o for o in me.get("orgs") or []}
        if namespace not in orgs:
            raise TokenCannotWrite(namespace, user, f"{user} is not a member of {namespace}")
        if orgs[namespace].get("roleInOrg") not in WRITE_ROLES:
            raise TokenCannotWrite(namespace, user, f"{user}'s role in {namespace} is {orgs[namespace].get('roleInOrg')}")
    if role == "read":
        raise TokenCannotWrite(namespace, user, "the token is read-only")
    if role == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        can = any(
            (s.get("entity") or {}).get("name") == namespace and "repo.write" in (s.get("permissions") or [])
            for s in scoped
        )
        if not can:
            raise TokenCannotWrite(namespace, user, f"the fine-grained token has no repo.write on {namespace}")


def private_quota(me: dict[str, Any], namespace: str) -> tuple[int | None, str]:
    if namespace == me.get("name"):
        return (PRO_PRIVATE_BYTES, "PRO") if me.get("isPro") else (FREE_PRIVATE_BYTES, "free")
    org = next((o for o in me.get("orgs") or [] if o.get("name") == namespace), {})
    if org.get("plan") in {"team", "enterprise", "plus"}:
        return None, str(org.get("plan"))
    return FREE_PRIVATE_BYTES, "free organisation"
