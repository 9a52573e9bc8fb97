"""`python -m quantkit.eval.worker`: the evaluation's own process (torch and exllamav2 live here).

The parent (`quantkit.eval.core`) writes jobs to its stdin, one JSON line each, naming the token rows,
the reference cache and the tasks; this process runs them in order and prints one JSON object per line on
stdout (`plan`, `row`, `done`, then `idle`). It lives as long as its parent's evaluation, so a run pays
for importing torch and exllamav2 once, not once per branch. Each task's result is written atomically to its `out` file as soon as it is known, so a worker
that dies (a segfault in a kernel, the OOM killer) loses only the task in flight, which the parent then
marks failed. A branch that fails to load or gives non-finite logits is a result (`status: failed`), not a
crash: the worker goes on with the next task.

Why a process: a branch that crashes it (a kernel's segfault, the OOM killer) cannot take the run down
with it, the parent starts a new one for the next branch, and `EXLLAMA_NO_SDPA` must be in the
environment before exllamav2 is imported.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from quantkit.eval import metrics
from quantkit.eval.records import TaskResult, write
from quantkit.files import write_text_atomic


def _say(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


def _rows(tokens: Path) -> list[Any]:
    from safetensors.torch import load_file

    ids = load_file(str(tokens))["input_ids"]
    return [ids[i] for i in range(ids.shape[0])]


def choose_mode(task: dict[str, Any], free: tuple[int, str] | None, missing: str | None = None) -> tuple[str, str]:
    """(mode, why) from the task's needs and the free VRAM: whole model, module by module, or (for the
    reference only) transformers on the CPU; "none" when nothing fits or exllamav2 cannot run."""
    wanted = task.get("mode", "auto")
    needs = task["needs"]
    if wanted == "transformers" or (wanted != "auto" and missing is None):
        return wanted, "as asked"
    if free is None:
        why = f"exllamav2 cannot be imported: {missing}" if missing else "no CUDA device"
        if task["kind"] == "reference":
            return "transformers", why
        return "none", why
    bytes_free, device = free
    gib = 1024**3
    if needs["full"] <= bytes_free:
        return "full", f"needs {needs['full'] / gib:.2f} GiB of {bytes_free / gib:.2f} GiB free on {device}"
    if needs["layers"] <= bytes_free:
        return "layers", (f"the whole model needs {needs['full'] / gib:.2f} GiB, {bytes_free / gib:.2f} GiB free on "
                          f"{device}; its largest module needs {needs['layers'] / gib:.2f} GiB")
    if task["kind"] == "reference":
        return "transformers", (f"even its largest module ({needs['layers'] / gib:.2f} GiB) does not fit "
                                f"{bytes_free / gib:.2f} GiB free on {device}")
    return "none", f"needs {needs['layers'] / gib:.2f} GiB for its largest module, {bytes_free / gib:.2f} GiB free on {device}"


def _logits(task: dict[str, Any], mode: str, rows: list[Any]) -> Any:
    from quantkit.eval import forward

    folder = Path(task["folder"])
    if mode == "transformers":
        return forward.transformers_logits(folder, rows), None
    model = forward.Exl2Model(folder, max_len=int(rows[0].shape[0]), layers=(mode == "layers"))
    return model.logits(rows), model


def _reference_rows(reference: Path, key: str, n: int) -> list[int]:
    """The reference rows still to compute: rows saved under the same key survive a killed worker (a
    large model's reference is the longest part of an evaluation); under another key all are redone."""
    stamp = reference / "key"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == key:
        return [i for i in range(n) if not metrics.row_path(reference, i).is_file()]
    if reference.is_dir():
        for old in reference.glob("row-*.safetensors"):
            old.unlink()
    reference.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, key)
    return list(range(n))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("exllamav2")
    except PackageNotFoundError:
        return "unknown"


def run_task(task: dict[str, Any], rows: list[Any], reference: Path, free: tuple[int, str] | None,
             missing: str | None = None) -> TaskResult:
    mode, why = choose_mode(task, free, missing)
    _say("plan", task=task["name"], kind=task["kind"], mode=mode, why=why)
    base = {"name": task["name"], "mode": mode, "key": task["key"], "exllamav2_version": _version()}
    if mode == "none":
        return TaskResult(**base, status="failed", error=why if missing or free is None else f"does not fit: {why}")
    model = None
    try:
        todo = _reference_rows(reference, task["key"], len(rows)) if task["kind"] == "reference" else list(range(len(rows)))
        logits, model = _logits(task, mode, [rows[i] for i in todo]) if todo else ([], None)
        acc = metrics.Accumulator()
        for i, row in zip(todo, logits):
            bad = metrics.non_finite(row)
            if bad:
                return TaskResult(**base, status="failed", error=f"non-finite logits in row {i} ({bad} values)")
            if task["kind"] == "reference":
                metrics.save_reference_row(reference, i, rows[i], row, top_k=int(task["top_k"]))
            else:
                acc.add(metrics.compare_row(metrics.load_reference_row(reference, i), rows[i], row))
            _say("row", task=task["name"], row=i + 1, rows=len(rows))
        if task["kind"] == "reference":
            return TaskResult(**base, status="done", **metrics.reference_summary(reference, len(rows)))
        return TaskResult(**base, status="done", **acc.summary())
    except Exception as exc:  # noqa: BLE001 - a branch that does not load is a result, said and recorded
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return TaskResult(**base, status="failed", error=f"{'does not load' if model is None else 'forward failed'}: {last}")
    finally:
        if model is not None:
            model.close()


def main() -> int:
    """Jobs as JSON lines on stdin, each answered by events and a final `idle`; EOF ends the process."""
    from quantkit.eval import forward

    # exllamav2 first: its import is what makes the CUDA device usable (it builds or loads its extension),
    # and what fails on a machine that cannot run it; the error is then every exllamav2 task's result.
    missing = forward.import_exllamav2()
    free = forward.free_vram() if missing is None else None
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        rows = _rows(Path(job["tokens"]))
        reference = Path(job["reference"])
        for task in job["tasks"]:
            if free is not None:
                free = forward.free_vram()  # what the previous model left behind
            result = run_task(task, rows, reference, free, missing)
            write(Path(task["out"]), result)
            _say("done", task=task["name"], status=result.status, error=result.error)
        _say("idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
