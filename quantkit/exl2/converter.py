"""The one seam to exllamav2's converter: argv, subprocess, status lines, the job-file verdict.

`Converter` runs `python -m exllamav2.conversion.convert_exl2` (or what `QUANTKIT_CONVERTER` names, e.g.
the test double) for a `MeasureJob` (`-om`) or a `ConvertJob` (`-m ... -cf`). Rules from exllamav2
0.3.2's behaviour (see shared/reference/exllamav2-0.3.2-facts.md):

- never `-nr`: it deletes `-o`, and a kept `-o` with its job_new.json is how exllamav2 resumes;
- PYTHONUNBUFFERED=1, because `os._exit(1)` on numeric errors drops buffered stdout;
- stdin is /dev/null and the child has its own session, because measure.py's SIGINT handler calls
  `input()`; quantkit stops it with SIGTERM instead;
- its own session also keeps it alive when quantkit dies, so on Linux the child asks the kernel for
  SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`, kill -9 included), and its PID is recorded
  beside `-o` (`<-o>.converter.pid`): a rerun that finds it still running (another OS, or a converter from
  before) stops it before starting one of its own, and says so;
- a job file that does not parse (a kill while exllamav2 rewrote it: it writes in place) or that
  measure.py marked "invalid" means "redo this stage": exllamav2 itself would only crash on it;
- success is `job_new.json` progress "finished" plus the expected files, never the exit code (bare
  `sys.exit()` exits 0 on most argument errors);
- quantkit's log and PID files lie beside `-o`, not in it: convert_exl2.py warns "Output directory is
  not empty" when a new job starts in a folder holding anything;
- `EXLLAMA_NO_SDPA=1` when no causal attention is installed (`quantkit.exl2.runtime` says why).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.errors import ConverterCancelled, ConverterFailed, ConverterMissing, JobMismatch, NoCudaDevice, WorkFolderBusy
from quantkit.exl2 import job as jobfile
from quantkit.exl2 import runtime
from quantkit.exl2.status import LogLine, classify

#: Names the converter command (shell words); tests point it at tests/double/convert_exl2.py.
CONVERTER_ENV = "QUANTKIT_CONVERTER"
#: The version to record in provenance when CONVERTER_ENV replaces the installed exllamav2.
CONVERTER_VERSION_ENV = "QUANTKIT_CONVERTER_VERSION"
DEFAULT_MODULE = "exllamav2.conversion.convert_exl2"
LOG_SUFFIX = ".converter.log"
#: The running converter's PID and start time, beside `-o`: how a rerun finds a converter that outlived quantkit.
PID_SUFFIX = ".converter.pid"
_PR_SET_PDEATHSIG = 1
#: Seconds between SIGTERM and SIGKILL when cancelling.
TERM_GRACE_S = 10.0


class MeasureJob(BaseModel):
    """One measurement pass: `-om` writes the measurement outside `-o`."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    work_dir: Path  # -o
    measurement: Path  # -om
    calibration: Path  # -c (parquet)
    rows: int  # -mr
    length: int  # -ml

    @property
    def task(self) -> str:
        return "measurement"


class ConvertJob(BaseModel):
    """One bitrate: `-m` reuses the measurement and `-cf` compiles the full model into `output_dir`."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path
    work_dir: Path  # -o, one per branch
    measurement: Path  # -m
    output_dir: Path  # -cf
    bits: float  # -b
    head_bits: int  # -hb
    calibration: Path  # -c
    rows: int  # -r
    length: int  # -l
    shard_size_mb: int | None = None  # -ss

    @property
    def task(self) -> str:
        return f"conversion to {self.bits:g} bpw"


Job = MeasureJob | ConvertJob


class Progress(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: str
    completion: float


class ConverterResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    exit_code: int | None
    log: Path
    seconds: float
    skipped: bool  # the job was already finished; nothing ran


def log_path(work_dir: Path) -> Path:
    """quantkit's log of every run of the job in `work_dir` (`-o`): beside it, so `-o` stays exllamav2's."""
    return work_dir.with_name(work_dir.name + LOG_SUFFIX)


def pid_path(work_dir: Path) -> Path:
    """The running converter's PID record for the job in `work_dir` (`-o`), beside it."""
    return work_dir.with_name(work_dir.name + PID_SUFFIX)


def converter_command() -> list[str]:
    custom = os.environ.get(CONVERTER_ENV, "").strip()
    if custom:
        return shlex.split(custom)
    return [sys.executable, "-m", DEFAULT_MODULE]


def converter_version() -> str:
    """The converter's version for provenance: the installed exllamav2's, or what the override declares."""
    if os.environ.get(CONVERTER_ENV, "").strip():
        return os.environ.get(CONVERTER_VERSION_ENV, "unknown")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("exllamav2")
    except PackageNotFoundError:
        return "unknown"


def preflight() -> None:
    """Refuse early when the real converter cannot run here: no exllamav2, or no CUDA device.

    Raises:
        ConverterMissing, NoCudaDevice. Nothing is checked when `QUANTKIT_CONVERTER` overrides it.
    """
    if os.environ.get(CONVERTER_ENV, "").strip():
        return
    if importlib.util.find_spec("exllamav2") is None or importlib.util.find_spec("torch") is None:
        raise ConverterMissing("exllamav2 is not installed")
    import torch  # heavy: only here, right before GPU work

    if not torch.cuda.is_available():
        raise NoCudaDevice(f"torch {torch.__version__} sees no CUDA device")


def build_argv(job: Job) -> list[str]:
    """exllamav2 0.3.2's argv for `job`, after the converter command. Never `-nr`."""
    argv = ["-i", str(job.model_dir), "-o", str(job.work_dir)]
    if isinstance(job, MeasureJob):
        argv += ["-om", str(job.measurement), "-c", str(job.calibration), "-mr", str(job.rows), "-ml", str(job.length)]
    else:
        argv += ["-m", str(job.measurement), "-b", str(float(job.bits)), "-hb", str(job.head_bits), "-cf", str(job.output_dir),
                 "-c", str(job.calibration), "-r", str(job.rows), "-l", str(job.length)]
        if job.shard_size_mb is not None:
            argv += ["-ss", str(job.shard_size_mb)]
    return argv + ["-so"]


#: Architectures exllamav2 builds with learned position embeddings (RopeStyle.NONE, architecture.py).
NO_ROPE_ARCHS = ("GPT2LMHeadModel", "GPTBigCodeForCausalLM")
#: config.py's keys for max_seq_len, in its order of preference (default 2048).
_CONTEXT_KEYS = ("max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions")


def saved_length(model_dir: Path, length: int) -> int:
    """The calibration length exllamav2 saves in its job: convert_exl2.py:211-218 shortens it to the
    model's context for architectures without RoPE (and saves that), so a resume must expect it."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return length
    if not isinstance(config, dict) or (config.get("architectures") or [None])[0] not in NO_ROPE_ARCHS:
        return length
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(source.get(key), int):
                return min(length, source[key])
    return min(length, 2048)


def _wanted(job: Job) -> dict[str, object]:
    """job_new.json keys that exllamav2 takes from an existing job over the command line on resume."""
    want: dict[str, object] = {"in_dir": str(job.model_dir), "cal_dataset": str(job.calibration)}
    length = saved_length(job.model_dir, job.length)
    if isinstance(job, MeasureJob):
        want |= {"measurement_rows": job.rows, "measurement_length": length, "output_measurement": str(job.measurement)}
    else:
        want |= {"bits": job.bits, "head_bits": job.head_bits, "dataset_rows": job.rows, "length": length,
                 "compile_full": str(job.output_dir)}
    return want


def check_resumable(job: Job) -> None:
    """A kept job must be *this* job: on resume exllamav2 silently overrides the command line with
    the settings saved in job_new.json ("Overriding options with settings from existing job").

    Raises:
        JobMismatch.
    """
    saved = jobfile.read_job(job.work_dir)
    if saved is None:
        return
    for key, value in _wanted(job).items():
        if key in saved and saved[key] != value:
            raise JobMismatch(job.work_dir, key, saved[key], value)


def missing_outputs(job: Job) -> str | None:
    if isinstance(job, MeasureJob):
        return jobfile.missing_measurement(job.measurement)
    return jobfile.missing_compiled(job.output_dir)


def is_finished(job: Job) -> bool:
    return jobfile.job_progress(job.work_dir) == "finished" and missing_outputs(job) is None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGTERM the child when quantkit dies; None elsewhere.

    The signal follows the *thread* that forked, so `Converter.run` must be called from a thread that
    outlives the converter (it waits for it, so it does).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # quantkit died before the prctl took effect
            os._exit(1)

    return hook


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), so a reused PID is not mistaken for
    it; None when it is gone or a zombie (dead, waiting for its parent to reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _record_pid(work_dir: Path, pid: int, argv: list[str]) -> None:
    from quantkit.files import write_json_atomic

    write_json_atomic(pid_path(work_dir), {"pid": pid, "start_ticks": _start_ticks(pid), "argv": argv,
                                            "quantkit_pid": os.getpid(), "quantkit_start_ticks": _start_ticks(os.getpid())})


def _live_pid(work_dir: Path, pid_key: str, ticks_key: str) -> int | None:
    """The PID recorded under `pid_key` in the job's PID file when that very process (same start
    time, so not a reused PID) is still running and is not this one, else None."""
    try:
        data = json.loads(pid_path(work_dir).read_text(encoding="utf-8"))
        pid, ticks = int(data[pid_key]), data.get(ticks_key)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or ticks is None or _start_ticks(pid) != ticks:
        return None
    return pid


def orphan(work_dir: Path) -> int | None:
    """The PID of a converter recorded in `work_dir` that is still running, else None."""
    return _live_pid(work_dir, "pid", "start_ticks")


def _owner(work_dir: Path) -> int | None:
    """The PID of the quantkit that started the recorded converter, when it is alive and not this one."""
    return _live_pid(work_dir, "quantkit_pid", "quantkit_start_ticks")


def stop_orphan(work_dir: Path, say: Callable[[str], None]) -> None:
    """Stop a converter left running by an earlier quantkit on this job folder (its session: it and
    anything it started), so two converters never write one job folder."""
    pid = orphan(work_dir)
    if pid is None:
        pid_path(work_dir).unlink(missing_ok=True)
        return
    owner = _owner(work_dir)
    if owner is not None:
        # Its quantkit is alive (one that took no work-folder lock, e.g. the core called directly):
        # not an orphan, and not ours to stop.
        raise WorkFolderBusy(work_dir, owner, f"a quantkit whose converter (PID {pid}) is writing this job folder")
    say(f"a converter left running by an earlier quantkit (PID {pid}) is writing {work_dir}: stopping it before resuming")
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while orphan(work_dir) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if orphan(work_dir) != pid:
            break
    pid_path(work_dir).unlink(missing_ok=True)


def redo_if_corrupt(job: Job, say: Callable[[str], None]) -> bool:
    """Clear a job folder whose job file does not read back, so the stage starts over; True if it did.

    Only quantkit's own folders are cleared: `-o` (and `-cf` for a conversion), both inside WORK.
    """
    path = job.work_dir / jobfile.JOB_FILE
    if not path.exists() or jobfile.job_progress(job.work_dir) not in (None, "invalid"):
        return False
    say(f"{path} is unreadable (a kill while it was written?): redoing the {job.task} from its start")
    for child in job.work_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if isinstance(job, ConvertJob) and job.output_dir.is_dir():
        shutil.rmtree(job.output_dir)
    return True


class Converter:
    """Runs one job at a time. `on_line` sees every classified console line (status events included).

    `env` is laid over the environment of each converter process: quantkit.parallel pins one GPU per
    conversion with `{"CUDA_VISIBLE_DEVICES": "<id>"}` (exllamav2 then sees it as cuda:0).
    """

    def __init__(self, command: list[str] | None = None, *, env: dict[str, str] | None = None) -> None:
        self.command = command or converter_command()
        self.env = dict(env or {})
        self._proc: subprocess.Popen[str] | None = None
        self._cancelled = threading.Event()

    def argv(self, job: Job) -> list[str]:
        return [*self.command, *build_argv(job)]

    def cancel(self) -> None:
        """SIGTERM the running converter (SIGKILL after a grace period); safe from another thread."""
        self._cancelled.set()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)

        def _kill_later() -> None:
            try:
                proc.wait(TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()

        threading.Thread(target=_kill_later, daemon=True).start()

    def run(self, job: Job, on_line: Callable[[LogLine], None] | None = None) -> ConverterResult:
        """Run `job` to the end, or resume it; return only when it finished with its files.

        Raises:
            JobMismatch: the work folder holds a job with other settings.
            ConverterCancelled: `cancel()` was called (or Ctrl-C); the work folder is kept.
            ConverterFailed: the converter ended without a finished job and its files.
        """
        log = log_path(job.work_dir)

        def say(text: str) -> None:
            if on_line is not None:
                on_line(LogLine(kind="warning", text=f"quantkit: {text}"))

        stop_orphan(job.work_dir, say)
        if is_finished(job):
            # Re-running a finished job makes exllamav2 print "Job is already finished" and exit 0.
            return ConverterResult(exit_code=None, log=log, seconds=0.0, skipped=True)
        redo_if_corrupt(job, say)
        check_resumable(job)
        argv = self.argv(job)
        env = runtime.exllamav2_env() | self.env | {"PYTHONUNBUFFERED": "1"}
        notice = runtime.notice_once()
        if notice is not None and on_line is not None:
            on_line(LogLine(kind="warning", text=notice))
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        stage = jobfile.job_progress(job.work_dir) or "begin"
        last_error = ""
        self._cancelled.clear()
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {shlex.join(argv)}\n")
            fh.flush()
            try:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    env=env, text=True, errors="replace", bufsize=1, start_new_session=True,
                    preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only a prctl call runs in the child
                )
            except OSError as exc:
                raise ConverterMissing(f"{shlex.join(self.command)}: {exc.strerror or exc}") from exc
            try:
                _record_pid(job.work_dir, self._proc.pid, argv)
                assert self._proc.stdout is not None
                for raw in self._proc.stdout:
                    fh.write(raw)
                    line = classify(raw)
                    if line.kind == "error":
                        last_error = line.text
                    if line.status is not None:
                        stage = line.status.stage
                    if on_line is not None:
                        on_line(line)
                code = self._proc.wait()
            except KeyboardInterrupt:
                self.cancel()
                self._proc.wait()
                raise ConverterCancelled(job.task, stage, log) from None
            finally:
                fh.write(f"=== exit {self._proc.returncode}\n")
                if self._proc.returncode is not None:
                    pid_path(job.work_dir).unlink(missing_ok=True)
                self._proc = None
        seconds = time.monotonic() - start
        if self._cancelled.is_set():
            raise ConverterCancelled(job.task, stage, log)
        progress = jobfile.job_progress(job.work_dir)
        if progress != "finished":
            reason = "the converter wrote no job file" if progress is None else f"its job stopped at progress {progress!r}"
            raise ConverterFailed(job.task, stage, reason, code, last_error, log)
        missing = missing_outputs(job)
        if missing is not None:
            raise ConverterFailed(job.task, stage, f"the job says finished but {missing}", code, last_error, log)
        return ConverterResult(exit_code=code, log=log, seconds=seconds, skipped=False)
