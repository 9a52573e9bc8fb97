"""One process per work folder: `run`, `measure`, `convert`, `publish` and `card --output` into WORK hold
WORK/.quantkit.lock while they work, so two of them never start converters on one job folder or
publish the same branch twice.

The lock is an OS file lock (filelock: `flock` on Linux), so it is released when its holder dies, even
by `kill -9`: a rerun after a crash never finds a stale lock. Who holds it is written beside it, so the
refusal names the holder's PID and command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from quantkit import guards
from quantkit.errors import WorkFolderBusy, WorkFolderNotWritable
from quantkit.files import write_json_atomic

LOCK_NAME = ".quantkit.lock"
HOLDER_NAME = ".quantkit.lock.holder.json"


def holder(work: Path) -> tuple[int | None, str | None]:
    """The PID and command recorded by the lock's holder (None, None when unknown)."""
    try:
        data = json.loads((work / HOLDER_NAME).read_text(encoding="utf-8"))
        return int(data["pid"]), str(data["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


@contextmanager
def work_lock(work: Path, command: str) -> Iterator[None]:
    """Hold WORK's lock for the block; refuse at once when another process holds it.

    Raises:
        WorkFolderBusy: another process holds the lock.
        WorkFolderNotWritable: WORK cannot be created or the lock cannot be written.
    """
    try:
        work.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(work / LOCK_NAME), timeout=0, thread_local=False)
        lock.acquire()
    except Timeout:
        pid, cmd = holder(work)
        raise WorkFolderBusy(work, pid, cmd) from None
    except (PermissionError, OSError) as exc:
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            raise WorkFolderNotWritable(work, "it is not a folder (a file is in the way)") from exc
        raise WorkFolderNotWritable(work, f"cannot write its lock file ({exc.strerror or exc})") from exc
    try:
        try:
            write_json_atomic(work / HOLDER_NAME, {"pid": os.getpid(), "command": command,
                                                   "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        except OSError as exc:
            raise WorkFolderNotWritable(work, f"cannot write in it ({exc.strerror or exc})") from exc
        try:
            yield
        except PermissionError as exc:
            # A read-only work folder (or a file in it): the one line says so instead of a traceback.
            if exc.filename is None or not guards.is_within(exc.filename, work):
                raise
            raise WorkFolderNotWritable(Path(exc.filename), f"cannot write it ({exc.strerror})") from exc
    finally:
        lock.release()


def command_line(*words: object) -> str:
    """What the holder says it is running: `quantkit run recipe.toml` and the like."""
    import shlex

    return shlex.join(["quantkit", *(str(w) for w in words)])
