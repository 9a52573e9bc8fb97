"""No local absolute path leaves the machine: JSON files about to be published (the recipe, provenance,
and the source's config.json whose `_name_or_path` often names the folder it was saved from) are
published as a copy with each such path replaced, when they hold one; every other file is published
as it is, straight from the work folder.

A path is replaced by the source's Hub id when it names the source folder, else by its last
component. The copies live in WORK/publish/files/<branch>/ and are rewritten only when they change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from quantkit.files import write_text_atomic

#: JSON files up to this size are checked; larger ones (an index of a big model) hold no paths quantkit wrote.
MAX_BYTES = 4 << 20
_WINDOWS = re.compile(r"^[A-Za-z]:[\\/]")


def is_local_path(value: str) -> bool:
    """An absolute path of this machine (or a Windows one): its first component exists here."""
    if "\n" in value or len(value) < 2:
        return False
    if _WINDOWS.match(value):
        return True
    if value.startswith("~/"):
        return True
    if not value.startswith("/"):
        return False
    first = value.split("/")[1]
    return bool(first) and Path("/", first).exists()


def _replacement(value: str, source: Path | None, source_id: str | None) -> str:
    path = Path(value.replace("\\", "/"))
    if source is not None and (path == source or source in path.parents):
        rel = path.relative_to(source).as_posix()
        base = source_id or source.name
        return base if rel == "." else f"{base}/{rel}"
    return path.name


def _scrub(data: Any, source: Path | None, source_id: str | None) -> tuple[Any, bool]:
    if isinstance(data, str):
        return (_replacement(data, source, source_id), True) if is_local_path(data) else (data, False)
    if isinstance(data, list):
        items = [_scrub(v, source, source_id) for v in data]
        return [v for v, _ in items], any(c for _, c in items)
    if isinstance(data, dict):
        out, changed = {}, False
        for k, v in data.items():
            new, c = _scrub(v, source, source_id)
            out[k], changed = new, changed or c
        return out, changed
    return data, False


def scrubbed_text(text: str, *, source: Path | None = None, source_id: str | None = None) -> str | None:
    """The JSON `text` with local paths replaced, or None when it holds none (or is not JSON)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    new, changed = _scrub(data, source, source_id)
    return json.dumps(new, indent=2, ensure_ascii=False) + "\n" if changed else None


def publishable(work: Path, branch: str, files: dict[str, Path]) -> dict[str, Path]:
    """`files` (path in repo -> local file) with each JSON file that holds a local path swapped for a
    scrubbed copy in WORK/publish/files/<branch>/."""
    from quantkit.source import read_source

    record = read_source(work)
    source = Path(record.path) if record is not None and record.path else None
    source_id = record.hub_id if record is not None else None
    out = dict(files)
    for name, local in files.items():
        if not name.endswith(".json") or local.stat().st_size > MAX_BYTES:
            continue
        text = scrubbed_text(local.read_text(encoding="utf-8", errors="replace"), source=source, source_id=source_id)
        if text is None:
            continue
        copy = work / "publish" / "files" / branch / name
        if not copy.is_file() or copy.read_text(encoding="utf-8") != text:
            copy.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(copy, text)
        out[name] = copy
    return out
