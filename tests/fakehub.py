"""An in-memory Hub for publish tests: the HfApi methods quantkit calls, with real commit semantics
(branches point at commits, a commit applies adds/deletes on its parent's files) and injected failures."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import httpx2
from huggingface_hub.errors import HfHubHTTPError

LFS_SUFFIXES = (".safetensors", ".bin")


def http_error(status: int, headers: dict[str, str] | None = None, message: str = "") -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/x"), headers=headers or {})
    return HfHubHTTPError(message or f"{status} Client Error", response=response, server_message=message or None)


@dataclass
class Commit:
    oid: str
    title: str
    parent: str | None
    files: dict[str, dict[str, Any]]  # path -> {size, sha256, blob_id, title}


def _describe(data: bytes, path: str, title: str) -> dict[str, Any]:
    lfs = path.endswith(LFS_SUFFIXES)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest() if lfs else None,
            "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "title": title, "data": data}  # noqa: S324


@dataclass
class FakeHub:
    user: str = "alice"
    token: str | None = "hf_fake"
    whoami_answer: dict[str, Any] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    repo: str | None = None
    private: bool | None = None
    fail: dict[str, list[BaseException]] = field(default_factory=dict)  # method -> errors for its next calls
    land_then_fail: list[BaseException] = field(default_factory=list)  # create_commit applies, then raises these
    noop_commits: int = 0  # create_commit calls that answer success and change nothing
    gated: Any = False

    def _maybe_fail(self, method: str) -> None:
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def _new_commit(self, title: str, parent: str | None, files: dict[str, dict[str, Any]]) -> str:
        oid = hashlib.sha1(f"{len(self.commits)}:{title}".encode()).hexdigest()  # noqa: S324
        self.commits[oid] = Commit(oid, title, parent, files)
        return oid

    def _resolve(self, revision: str | None) -> Commit:
        rev = revision or "main"
        return self.commits[self.branches.get(rev, rev)]

    # ---- HfApi ------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool = False, exist_ok: bool = False, repo_type: str | None = None) -> Any:
        self._maybe_fail("create_repo")
        if self.repo is None:
            self.repo, self.private = repo_id, private
            files = {".gitattributes": _describe(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", ".gitattributes", "initial commit")}
            self.branches["main"] = self._new_commit("initial commit", None, files)
        return SimpleNamespace(repo_id=repo_id)

    def list_repo_commits(self, repo_id: str, *, revision: str | None = None) -> list[Any]:
        self._maybe_fail("list_repo_commits")
        out, c = [], self._resolve(revision)
        while True:
            out.append(SimpleNamespace(commit_id=c.oid, title=c.title))
            if c.parent is None:
                return out
            c = self.commits[c.parent]

    def list_repo_refs(self, repo_id: str) -> Any:
        self._maybe_fail("list_repo_refs")
        return SimpleNamespace(branches=[SimpleNamespace(name=n, target_commit=o) for n, o in self.branches.items()])

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None, exist_ok: bool = False) -> None:
        self._maybe_fail("create_branch")
        if branch not in self.branches:
            self.branches[branch] = self._resolve(revision).oid

    def list_repo_tree(self, repo_id: str, *, revision: str | None = None, recursive: bool = False, expand: bool = False) -> Any:
        self._maybe_fail("list_repo_tree")
        for path, f in sorted(self._resolve(revision).files.items()):
            yield SimpleNamespace(path=path, size=f["size"], blob_id=f["blob_id"],
                                  lfs=SimpleNamespace(sha256=f["sha256"]) if f["sha256"] else None,
                                  last_commit=SimpleNamespace(title=f["title"]) if expand else None)

    def create_commit(self, repo_id: str, *, operations: list[Any], commit_message: str, revision: str | None = None,
                      repo_type: str | None = None) -> Any:
        self._maybe_fail("create_commit")
        branch = revision or "main"
        head = self._resolve(branch)
        if self.noop_commits:
            self.noop_commits -= 1
            return SimpleNamespace(oid=head.oid)
        files = dict(head.files)
        for op in operations:
            if hasattr(op, "path_or_fileobj"):
                files[op.path_in_repo] = _describe(Path(op.path_or_fileobj).read_bytes(), op.path_in_repo, commit_message)
            else:
                files.pop(op.path_in_repo, None)
        if files == head.files:  # huggingface_hub: "No files have been modified since last commit"
            return SimpleNamespace(oid=head.oid)
        self.branches[branch] = self._new_commit(commit_message, head.oid, files)
        if self.land_then_fail:
            raise self.land_then_fail.pop(0)
        return SimpleNamespace(oid=self.branches[branch])

    def whoami(self) -> dict[str, Any]:
        self._maybe_fail("whoami")
        return self.whoami_answer or {"name": self.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    def model_info(self, repo_id: str) -> Any:
        self._maybe_fail("model_info")
        return SimpleNamespace(id=repo_id, gated=self.gated)

    # ---- for tests --------------------------------------------------------------------------------

    def files(self, branch: str) -> dict[str, bytes]:
        return {p: f["data"] for p, f in self._resolve(branch).files.items()}

    def history(self, branch: str) -> list[str]:
        return [c.title for c in self.list_repo_commits(self.repo or "", revision=branch)]

    def mock(self) -> MagicMock:
        """A MagicMock that records every call and forwards it here (tests assert the exact calls)."""
        m = MagicMock(wraps=self)
        m.token = self.token
        return m
