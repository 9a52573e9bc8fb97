"""exllamav2's job file (`job_new.json` in `-o`) and the output files a finished job must leave.

The converter's exit status says little (bare `sys.exit()` is 0 on many errors), so quantkit decides
success from two facts only: `job_new.json["progress"] == "finished"` and the expected files exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from quantkit.exl2.status import PROGRESS

JOB_FILE = "job_new.json"
_SHARD = re.compile(r"^output(?:-(\d{5})-of-(\d{5}))?\.safetensors$")


def read_job(work_dir: Path) -> dict[str, Any] | None:
    """The job dict, or None when there is none or it cannot be parsed (a kill mid-write)."""
    path = work_dir / JOB_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_progress(work_dir: Path) -> str | None:
    job = read_job(work_dir)
    if job is None:
        return None
    if "invalid" in job:
        # measure.py sets "invalid" while it swaps its hidden-state checkpoint; a kill there corrupts the job.
        return "invalid"
    progress = job.get("progress")
    return progress if progress in PROGRESS else None


def output_shards(folder: Path) -> list[Path]:
    """compile.py's shards: `output.safetensors`, or all of `output-0000i-of-0000N.safetensors`.
    An incomplete set (a kill while renaming) returns []."""
    if not folder.is_dir():
        return []
    single = folder / "output.safetensors"
    if single.is_file():
        return [single]
    found: dict[int, Path] = {}
    total = 0
    for p in folder.iterdir():
        m = _SHARD.match(p.name)
        if m and m.group(1):
            found[int(m.group(1))] = p
            total = int(m.group(2))
    if total and sorted(found) == list(range(1, total + 1)):
        return [found[i] for i in range(1, total + 1)]
    return []


def missing_measurement(path: Path) -> str | None:
    """Why `path` is not a complete measurement file, or None when it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no measurement file was written"
    except (OSError, ValueError) as exc:
        return f"the measurement file is unreadable ({exc.__class__.__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("measurement"), dict) or not data["measurement"]:
        return "the measurement file has no measurements"
    return None


def missing_compiled(folder: Path) -> str | None:
    """Why `folder` (the `-cf` dir) is not a complete compiled model, or None when it is."""
    if not output_shards(folder):
        return "no complete set of output*.safetensors shards"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable config.json"
    if (config.get("quantization_config") or {}).get("quant_method") != "exl2":
        return "config.json has no exl2 quantization_config"
    return None
