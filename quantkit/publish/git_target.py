"""A local git repository as a publish target: the same branch layout the Hub gets (main with the
measurement and card, each bitrate on a branch cut from the first commit), written with git's plumbing
through a private index, so the user's checkout is never touched except to follow a branch it has out.

Files are stored as plain git blobs: git-lfs is not required. Pushing the result to the Hub needs
`git lfs migrate import --everything --include="*.safetensors"` first (the Hub refuses big non-LFS files).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from quantkit.errors import GitFailed, LocalTargetDirty
from quantkit.files import write_json_atomic
from quantkit.publish.target import RemoteFile, Target

#: The Hub's first commit holds a .gitattributes sending big binaries to LFS; the local target mirrors it.
GITATTRIBUTES = "\n".join(f"{p} filter=lfs diff=lfs merge=lfs -text" for p in (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.model", "*.parquet",
)) + "\n"
_IDENTITY = {"GIT_AUTHOR_NAME": "quantkit", "GIT_AUTHOR_EMAIL": "quantkit@localhost",
             "GIT_COMMITTER_NAME": "quantkit", "GIT_COMMITTER_EMAIL": "quantkit@localhost"}


class GitTarget(Target):
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()
        self.id = f"git:{self.path}"
        self._first: str | None = None

    # ---- git ----------------------------------------------------------------------------------------

    def git(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
        full = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
        if not self._has_identity():
            full.update(_IDENTITY)
        try:
            proc = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True, env=full,
                                  input=stdin, check=False)
        except FileNotFoundError as exc:
            raise GitFailed(list(args), "git is not installed") from exc
        if proc.returncode != 0:
            raise GitFailed(list(args), (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1])
        return proc.stdout

    def _has_identity(self) -> bool:
        if not hasattr(self, "_identity"):
            proc = subprocess.run(["git", "-C", str(self.path), "config", "user.email"], capture_output=True, text=True, check=False) \
                if self.path.is_dir() else None
            self._identity = bool(proc and proc.returncode == 0 and proc.stdout.strip())
        return self._identity

    def _bare(self) -> bool:
        return self.git("rev-parse", "--is-bare-repository").strip() == "true"

    # ---- the Target operations ---------------------------------------------------------------------

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / ".git").exists() and not (self.path / "HEAD").is_file():
            self.git("init", "-q", "-b", "main")
        if not self._bare():
            self._finish_follow()
            dirty = [line[3:] for line in self.git("status", "--porcelain").splitlines()]
            if dirty:
                raise LocalTargetDirty(self.path, dirty)
        if not self.branches():
            blob = self.git("hash-object", "-w", "--stdin", stdin=GITATTRIBUTES).strip()
            tree = self.git("mktree", stdin=f"100644 blob {blob}\t.gitattributes\n").strip()
            commit = self.git("commit-tree", tree, "-m", "initial commit").strip()
            self._begin_follow("main")
            self.git("update-ref", "refs/heads/main", commit, "0" * 40)
            self._follow("main", None, commit)
            self._end_follow()

    def first_commit(self) -> str:
        if self._first is None:
            self._first = self.git("rev-list", "--max-parents=0", "refs/heads/main").split()[-1]
        return self._first

    def branches(self) -> set[str]:
        return set(self.git("for-each-ref", "--format=%(refname:short)", "refs/heads/").split())

    def create_branch(self, branch: str, from_commit: str) -> None:
        self.git("update-ref", f"refs/heads/{branch}", from_commit, "0" * 40)

    def list_files(self, revision: str) -> dict[str, RemoteFile]:
        authors: dict[str, str] = {}
        title = ""
        for line in self.git("log", "--format=%x01%s", "--name-only", "--no-renames", revision, "--").splitlines():
            if line.startswith("\x01"):
                title = line[1:]
            elif line:
                authors.setdefault(line, title)
        out = {}
        for line in self.git("ls-tree", "-r", "-l", "--full-tree", revision).splitlines():
            meta, path = line.split("\t", 1)
            _mode, kind, oid, size = meta.split()
            if kind != "blob":
                continue
            out[path] = RemoteFile(path=path, size=int(size), sha256=None, blob_id=oid,
                                   by_quantkit=authors.get(path, "").startswith("quantkit"))
        return out

    def commit(self, branch: str, adds: dict[str, Path], deletes: list[str], message: str) -> str:
        ref = f"refs/heads/{branch}"
        parent = self.git("rev-parse", ref).strip()
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.git("read-tree", parent, env=env)
            for path, local in sorted(adds.items()):
                # git runs inside the target repository: hand it an absolute path to the work folder's file.
                oid = self.git("hash-object", "-w", "--no-filters", "--", str(Path(local).resolve())).strip()
                self.git("update-index", "--add", "--cacheinfo", f"100644,{oid},{path}", env=env)
            for path in deletes:
                self.git("update-index", "--force-remove", "--", path, env=env)
            tree = self.git("write-tree", env=env).strip()
        commit = self.git("commit-tree", tree, "-p", parent, "-m", message).strip()
        self._begin_follow(branch)
        self.git("update-ref", ref, commit, parent)  # fails if the branch moved meanwhile
        self._follow(branch, parent, commit)
        self._end_follow()
        return commit

    # ---- the checkout follows its branch without a crash window -------------------------------------
    #
    # update-ref and the checkout's read-tree are two steps: a kill between them leaves the branch at
    # the new commit and the files at the old one, which looks like uncommitted changes forever. A
    # marker written before the ref moves (after prepare() found the checkout clean) says the checkout
    # is quantkit's to bring along; the next prepare() finishes the job to whatever the branch holds.

    def _marker(self) -> Path | None:
        if self._bare():
            return None
        return Path(self.git("rev-parse", "--absolute-git-dir").strip()) / "quantkit-follow.json"

    def _begin_follow(self, branch: str) -> None:
        marker = self._marker()
        if marker is not None:
            write_json_atomic(marker, {"branch": branch})

    def _end_follow(self) -> None:
        marker = self._marker()
        if marker is not None:
            marker.unlink(missing_ok=True)

    def _finish_follow(self) -> None:
        """Complete an update a kill interrupted: the checkout takes the tree its branch points at."""
        marker = self._marker()
        if marker is None or not marker.is_file():
            return
        try:
            branch = str(json.loads(marker.read_text(encoding="utf-8"))["branch"])
        except (OSError, ValueError, KeyError, TypeError):
            branch = ""
        # git's own lock files, left by a kill inside update-ref or read-tree; the work folder's lock
        # says no other quantkit is here, and the marker says this update was quantkit's.
        for stale in (marker.parent / "index.lock", marker.parent / "refs" / "heads" / f"{branch}.lock"):
            if branch and stale.is_file():
                stale.unlink()
        try:
            head = self.git("symbolic-ref", "-q", "HEAD").strip()
        except GitFailed:
            head = ""
        if branch and head == f"refs/heads/{branch}":
            try:
                tip = self.git("rev-parse", "--verify", "-q", head).strip()
            except GitFailed:
                tip = ""  # the first commit never landed: prepare() makes it again
            if tip:
                self.git("read-tree", "-u", "--reset", tip)
        marker.unlink(missing_ok=True)

    def _follow(self, branch: str, old: str | None, new: str) -> None:
        """Bring a non-bare checkout of `branch` along (it was clean: prepare() checked)."""
        try:
            head = self.git("symbolic-ref", "-q", "HEAD").strip()
        except GitFailed:  # a detached HEAD follows no branch
            return
        if self._bare() or head != f"refs/heads/{branch}":
            return
        if old is None:
            self.git("read-tree", "-u", "--reset", new)
        else:
            self.git("read-tree", "-u", "-m", old, new)
