"""A local git repository as a publish target: the same branch layout the Hub gets (main with the
measurement and card, each bitrate on a branch cut from the first commit), written with git's plumbing
through a private index, so the user's checkout is never touched except to follow a branch it has out.

With git-lfs installed, big files (the patterns of the Hub's own .gitattributes) are stored as LFS
objects, so the repository pushes to the Hub as it is (`push_commands`). Without it they are plain git
blobs, and `push_commands` says how to move them into LFS first: the Hub refuses big non-LFS files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from quantkit.errors import GitFailed, LocalTargetDirty, LocalTargetNotRepo
from quantkit.files import write_json_atomic
from quantkit.publish.target import RemoteFile, Target

#: The Hub's first commit holds a .gitattributes sending big binaries to LFS; the local target mirrors it.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.model", "*.parquet")
GITATTRIBUTES = "\n".join(f"{p} filter=lfs diff=lfs merge=lfs -text" for p in LFS_PATTERNS) + "\n"
LFS_POINTER_MAX = 1024  # bytes: a pointer file is about 130
_POINTER_HEAD = "version https://git-lfs.github.com/spec/v1"
_IDENTITY = {"GIT_AUTHOR_NAME": "quantkit", "GIT_AUTHOR_EMAIL": "quantkit@localhost",
             "GIT_COMMITTER_NAME": "quantkit", "GIT_COMMITTER_EMAIL": "quantkit@localhost"}


def lfs_available() -> bool:
    """git-lfs is installed (`git lfs version` answers)."""
    try:
        proc = subprocess.run(["git", "lfs", "version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return False
    return proc.returncode == 0


def is_lfs_path(path: str) -> bool:
    return any(fnmatch.fnmatch(PurePosixPath(path).name, p) for p in LFS_PATTERNS)


def _parse_pointer(text: str) -> tuple[str, int] | None:
    """(sha256, size) of an LFS pointer file, or None when `text` is not one."""
    if not text.startswith(_POINTER_HEAD):
        return None
    fields = dict(line.split(" ", 1) for line in text.splitlines()[1:] if " " in line)
    oid, size = fields.get("oid", ""), fields.get("size", "")
    if not oid.startswith("sha256:") or not size.isdigit():
        return None
    return oid.removeprefix("sha256:"), int(size)


class GitTarget(Target):
    """`lfs`: store big files with git-lfs (default: when it is installed)."""

    def __init__(self, path: Path, *, lfs: bool | None = None) -> None:
        self.path = path.expanduser().resolve()
        self.id = f"git:{self.path}"
        self.lfs = lfs_available() if lfs is None else lfs
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

    def _is_repo(self) -> bool:
        return (self.path / ".git").exists() or (self.path / "HEAD").is_file()

    def check_usable(self) -> None:
        """Refuse, before anything is written there, a file or a non-empty folder that is not a repository."""
        if self.path.exists() and not self.path.is_dir():
            raise LocalTargetNotRepo(self.path, "it is a file")
        if self.path.is_dir() and not self._is_repo():
            found = sorted(p.name for p in self.path.iterdir())
            if found:
                raise LocalTargetNotRepo(self.path, ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else ""))

    def prepare(self) -> None:
        self.check_usable()
        self.path.mkdir(parents=True, exist_ok=True)
        if not self._is_repo():
            self.git("init", "-q", "-b", "main")
        if self.lfs:
            # The filters (a checkout shows the files, not pointers) and the pre-push hook that uploads them.
            self.git("lfs", "install", "--local")
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
        return self._resolve_pointers(out)

    def _resolve_pointers(self, files: dict[str, RemoteFile]) -> dict[str, RemoteFile]:
        """LFS pointers stand for their object: its size and sha256, as the Hub lists them."""
        small = [f for f in files.values() if is_lfs_path(f.path) and f.size <= LFS_POINTER_MAX]
        if not small:
            return files
        proc = subprocess.run(["git", "-C", str(self.path), "cat-file", "--batch"], capture_output=True, check=False,
                              input="".join(f"{f.blob_id}\n" for f in small).encode())
        if proc.returncode != 0:
            raise GitFailed(["cat-file", "--batch"], proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}")
        answer, pos, out = proc.stdout, 0, dict(files)
        for f in small:
            header_end = answer.index(b"\n", pos)
            size = int(answer[pos:header_end].split()[2])
            body = answer[header_end + 1: header_end + 1 + size]
            pos = header_end + 1 + size + 1
            pointer = _parse_pointer(body.decode("ascii", "replace"))
            if pointer is not None:
                out[f.path] = RemoteFile(path=f.path, size=pointer[1], sha256=pointer[0], blob_id=None, by_quantkit=f.by_quantkit)
        return out

    def commit(self, branch: str, adds: dict[str, Path], deletes: list[str], message: str) -> str:
        ref = f"refs/heads/{branch}"
        parent = self.git("rev-parse", ref).strip()
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.git("read-tree", parent, env=env)
            for path, local in sorted(adds.items()):
                if self.lfs and is_lfs_path(path):
                    oid = self._lfs_blob(path, Path(local))
                else:
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

    def _lfs_blob(self, path: str, local: Path) -> str:
        """Store `local` as an LFS object (git-lfs's own clean filter) and return its pointer's blob id."""
        with local.open("rb") as fh:
            proc = subprocess.run(["git", "-C", str(self.path), "lfs", "clean", "--", path], stdin=fh, capture_output=True,
                                  env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, check=False)
        if proc.returncode != 0 or _parse_pointer(proc.stdout.decode("ascii", "replace")) is None:
            reason = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
            raise GitFailed(["lfs", "clean", path], reason.splitlines()[-1])
        return self.git("hash-object", "-w", "--stdin", stdin=proc.stdout.decode("ascii")).strip()

    def push_commands(self, repo: str | None) -> list[str]:
        """What pushes this repository's branches to the Hub repo `repo`."""
        url = f"https://huggingface.co/{repo or 'USER/NAME'}"
        where = f"git -C {self.path}"
        # A new Hub repo starts with a commit of its own: --force replaces it with this repository's history.
        push = [f"hf repos create {repo or 'USER/NAME'} --exist-ok", f"hf lfs-enable-largefiles {self.path}",
                f"{where} push --force {url} --all"]
        if self.lfs:
            return push
        include = ",".join(LFS_PATTERNS)
        return ["# install git-lfs first (e.g. apt-get install git-lfs), then:", f"{where} lfs install --local",
                f'{where} lfs migrate import --everything --include="{include}"', *push]

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
