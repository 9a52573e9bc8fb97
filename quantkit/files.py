"""Crash-safe file writes for the work folder: a kill leaves the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from quantkit.errors import OutputPathInvalid


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask() sets it to read it,
    which would race with the run's publish thread creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _commit(tmp: str, path: Path) -> None:
    """The instant a write takes effect: one rename. Tests inject kills here, before and after it."""
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write beside `path` under a unique temporary name, fsync, then rename over it.

    The unique name keeps two writers (the run and its publish thread) from sharing a temporary file;
    a failed write leaves no temporary behind. The file gets the modes a plain `open()` would give it
    (0666 less the umask): mkstemp's 0600 would hide results from the group on a shared server.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any, *, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_output(path: Path, text: str) -> None:
    """A file the user named (`--output`), written atomically.

    Raises:
        OutputPathInvalid: a file is in the way of its folder, or the folder cannot be written.
    """
    try:
        write_text_atomic(path, text)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputPathInvalid(path, "a file is in the way of its folder") from exc
    except IsADirectoryError as exc:
        raise OutputPathInvalid(path, "it is a folder") from exc
    except PermissionError as exc:
        raise OutputPathInvalid(path, f"cannot write there ({exc.strerror})") from exc


def check_folder_path(path: Path) -> None:
    """Refuse a folder path that cannot be created because a file sits on it or on its way, before any
    work is spent on what would be written there.

    Raises:
        OutputPathInvalid.
    """
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputPathInvalid(path, f"{p} is a file, not a folder")
            return
