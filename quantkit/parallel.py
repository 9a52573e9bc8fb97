"""Branches converted side by side on one machine: one converter process per GPU.

Once measured, each bitrate's conversion needs only the model, measurement.json and one GPU, so with
several GPUs the branches need not wait for each other. Each conversion gets its own converter
process with `CUDA_VISIBLE_DEVICES=<its GPU>` (exllamav2 hard-codes cuda:0, which is then that GPU).

- GPUs are found without torch or CUDA: `CUDA_VISIBLE_DEVICES` when it is set (what this process is
  allowed to use), else `nvidia-smi -L`. Tests set `CUDA_VISIBLE_DEVICES`; it is the seam.
- How many at once: one per GPU, fewer when the system RAM each conversion holds (its hidden states
  and embeddings: `quantkit.exl2.resources.convert_needs`) would not fit in the RAM available now.
- The work folder is the one `Pipeline` keeps: each conversion is `Pipeline.convert` in a thread, so
  resume, settings locks, state.json and the card behave as with one GPU. The work every branch shares
  (the adapter's working copy, the disk check for all of them) is done once, before the threads start.
- A failure stops new conversions from starting; those running finish (their hours are not thrown
  away), then the first error is raised. Ctrl-C cancels every running converter; the work is kept.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.branches import Branch
from quantkit.errors import NoSuchGpu
from quantkit.exl2 import converter as conv
from quantkit.exl2.status import LogLine
from quantkit.pipeline import BranchResult, Pipeline

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
_SMI_LINE = re.compile(r"^GPU (\d+):.*?(?:\(UUID: (\S+)\))?\s*$", re.M)


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The GPU ids this process may use, as `CUDA_VISIBLE_DEVICES` accepts them; [] when there are none.

    `CUDA_VISIBLE_DEVICES` wins when set (CUDA itself stops at the first entry it cannot parse, and
    "-1" or "" hides every GPU); otherwise `nvidia-smi -L` lists the machine's GPUs by index.
    """
    env = dict(os.environ) if env is None else env
    if VISIBLE_ENV in env:
        ids: list[str] = []
        for item in env[VISIBLE_ENV].split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return ids
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    return [m.group(1) for m in _SMI_LINE.finditer(proc.stdout)]


def choose_gpus(option: str | None, visible: list[str]) -> list[str]:
    """The GPUs `--gpus` names ("0,2", "all"), checked against `visible`. Without the option: all visible
    ones when there are several, else [] (one conversion after another, as without --gpus).

    Raises:
        NoSuchGpu: a named GPU is not visible here.
    """
    if option is None:
        return visible if len(visible) > 1 else []
    text = option.strip()
    if text.lower() == "all":
        if not visible:
            raise NoSuchGpu("all", visible)
        return visible
    named = [x.strip() for x in text.split(",") if x.strip()]
    if not named:
        raise NoSuchGpu(option, visible)
    for gpu in named:
        if gpu not in visible:
            raise NoSuchGpu(gpu, visible)
    return list(dict.fromkeys(named))


def available_ram() -> int | None:
    """Bytes of system RAM available now (Linux MemAvailable), or None where it cannot be read."""
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


class SlotPlan(BaseModel):
    """Which GPUs, and how many conversions at once."""

    model_config = ConfigDict(frozen=True)

    gpus: list[str]
    at_once: int
    ram_each: int  # the largest conversion's system RAM
    ram_available: int | None

    @property
    def limited_by_ram(self) -> bool:
        return self.at_once < len(self.gpus)


def plan_slots(p: Pipeline, branches: list[Branch], gpus: list[str], *, ram_available: int | None = None) -> SlotPlan:
    """One conversion per GPU, as many at once as the RAM available holds (at least one)."""
    ram_each = max((p.convert_needs(b).ram_bytes for b in branches), default=0)
    at_once = len(gpus)
    if ram_available is not None and ram_each > 0:
        at_once = max(1, min(at_once, ram_available // ram_each))
    return SlotPlan(gpus=gpus, at_once=at_once, ram_each=ram_each, ram_available=ram_available)


def pinned(gpu: str) -> conv.Converter:
    """A converter whose processes see only `gpu`."""
    return conv.Converter(env={VISIBLE_ENV: gpu})


def convert_parallel(p: Pipeline, branches: list[Branch], plan: SlotPlan, *,
                     on_done: Callable[[BranchResult], None] | None = None) -> list[BranchResult]:
    """Convert `branches`, up to `plan.at_once` at a time, each on a free GPU of `plan`.

    `on_done` runs on the calling thread as each branch finishes (the run hands it to the publisher);
    an exception from it stops new conversions like a failed conversion does.
    Returns the results in the order of `branches`.
    """
    p.calibration_set()
    todo = [b for b in branches if not conv.is_finished(p.convert_job(b))]
    if todo:
        conv.preflight()
        p.check_disk([p.convert_needs(b) for b in todo])
        p.converter_input()  # once, not from N threads at once
    free: queue.Queue[str] = queue.Queue()
    for gpu in plan.gpus:
        free.put(gpu)
    running: dict[str, conv.Converter] = {}
    guard = threading.Lock()
    stop = threading.Event()
    clock = _BusyClock()

    def one(branch: Branch) -> BranchResult:
        if stop.is_set():
            raise _NotStarted(branch.name)
        gpu = free.get()
        converter = _Timed(clock, env={VISIBLE_ENV: gpu})
        with guard:
            running[branch.name] = converter
        try:
            return p.convert(branch, converter=converter)
        finally:
            with guard:
                running.pop(branch.name, None)
            free.put(gpu)

    results: dict[str, BranchResult] = {}
    first_error: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=plan.at_once, thread_name_prefix="quantkit-convert")
    try:
        futures: dict[Future[BranchResult], Branch] = {pool.submit(one, b): b for b in branches}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                exc = f.exception()
                if isinstance(exc, _NotStarted):
                    continue
                if exc is not None:
                    first_error = first_error or exc
                    stop.set()
                    continue
                results[futures[f].name] = f.result()
                if on_done is not None and first_error is None:
                    try:
                        on_done(results[futures[f].name])
                    except BaseException as e:  # noqa: BLE001 - raised below, after the others finish
                        first_error = e
                        stop.set()
    except BaseException:  # Ctrl-C: every running converter stops; its work folder is kept
        stop.set()
        with guard:
            for c in running.values():
                c.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # The overhead figure wants the wall time while any converter ran, not the sum over branches
        # (Pipeline.convert added each branch's own seconds).
        p.converter_seconds += clock.busy - sum(r.converter_seconds for r in results.values())
    if first_error is not None:
        raise first_error
    return [results[b.name] for b in branches]


class _BusyClock:
    """Wall time during which at least one converter process ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._since = 0.0
        self.busy = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._since = time.monotonic()
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.busy += time.monotonic() - self._since


class _Timed(conv.Converter):
    def __init__(self, clock: _BusyClock, *, env: dict[str, str]) -> None:
        super().__init__(env=env)
        self.clock = clock

    def run(self, job: conv.Job, on_line: Callable[[LogLine], None] | None = None) -> conv.ConverterResult:
        self.clock.enter()
        try:
            return super().run(job, on_line)
        finally:
            self.clock.leave()


class _NotStarted(Exception):
    """A conversion that was not started because another one failed first."""
