"""A queue of models over a Ray cluster: each measurement and each branch conversion is a Ray task
that needs one GPU (the optional extra `quantkit-exl2[ray]`).

Who does what:
- The driver (the machine running `quantkit run ... --cluster`) keeps every work folder: it locks the
  settings, builds the calibration set (it needs the model's config and tokenizer, not its weights),
  records each step in WORK/state.json, writes measurement.json when it arrives, publishes `main`, and
  copies each node's publish record into WORK/state.json. A rerun redoes only what the state does not
  say is done, whichever machine failed.
- A node runs a task in its own folder (`--node-work`, $QUANTKIT_NODE_WORK, else quantkit-cluster in
  its temporary folder), one per work folder and task, with the same `Pipeline` as a single machine:
  it fetches the model itself (from the Hub, or a path on shared storage), converts, and publishes
  the branch it converted. A task retried on the same node resumes the converter's job folder.
- measurement.json travels through Ray's object store: the measurement task returns its bytes, and
  each conversion task takes that object as an argument; calibration files travel with the task.
- Progress: tasks send their converter's status lines to a small relay actor that the driver drains
  into its terminal while it waits.

Failures: Ray retries a task whose worker or node died (`max_retries`); a task that fails for a reason
(its node cannot fetch the model, the converter failed) is not retried: it is recorded as failed with
that reason, the other tasks go on, and the run ends with `ClusterTasksFailed` naming each.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict

from quantkit import calibration
from quantkit.branches import Branch
from quantkit.errors import ClusterTasksFailed, ClusterUnreachable, MissingExtra, QuantkitError
from quantkit.exl2 import measurement as meas
from quantkit.exl2.status import LogLine
from quantkit.files import write_bytes_atomic, write_text_atomic
from quantkit.pipeline import Listener, Pipeline, Settings, convert_step
from quantkit.publish import PublishOptions, Publisher
from quantkit.publish.engine import published, set_published
from quantkit.publish.git_target import GitTarget
from quantkit.worklock import command_line, work_lock
from quantkit.workfolder import BranchProvenance, PublishRecord

RAY_EXTRA = '"quantkit-exl2[ray]"'
NODE_WORK_ENV = "QUANTKIT_NODE_WORK"
#: Seconds to wait for a TCP answer from the cluster's address before calling it unreachable.
PROBE_TIMEOUT_S = 5.0
#: Seconds between two looks at finished tasks and relayed progress.
POLL_S = 0.25


def import_ray() -> ModuleType:
    """Raises MissingExtra when Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise MissingExtra(RAY_EXTRA, "run on a Ray cluster (--cluster)") from None
    return ray


def connect(address: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Join the Ray cluster at `address` ("ray://HOST:PORT", "HOST:PORT" or "auto").

    Probes the address first, so an address that does not answer is refused in seconds rather than
    after Ray's own long retries. A process that has already called `ray.init` keeps its connection.

    Raises:
        MissingExtra: Ray is not installed.
        ClusterUnreachable: nothing answers at `address`, or Ray cannot join it.
    """
    ray = import_ray()
    if ray.is_initialized():
        return
    if address != "auto":
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            raise ClusterUnreachable(address, exc.strerror or str(exc) or type(exc).__name__) from None
    try:
        # log_to_driver=False: the tasks' output reaches this terminal through the relay, as progress.
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except ImportError:  # ray:// needs Ray Client's grpcio, which the extra brings
        raise MissingExtra(RAY_EXTRA, "reach a cluster through Ray Client (ray://)") from None
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise ClusterUnreachable(address, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None


def _host_port(address: str) -> tuple[str, int]:
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?(?::(\d+))?", address.strip())
    if m is None or not m.group(1):
        raise ClusterUnreachable(address, "not an address: write ray://HOST:PORT, HOST:PORT or auto")
    default = 10001 if address.startswith("ray://") else 6379  # Ray Client's port; the GCS's
    return m.group(1), int(m.group(2) or default)


# ---- what travels to a node ---------------------------------------------------------------------------


class TargetSpec(BaseModel):
    """Where a node publishes: the driver's choice, made once (a node never picks a fallback itself)."""

    model_config = ConfigDict(frozen=True)

    id: str
    git_path: Path | None = None  # a local git repository, on storage the nodes share
    hub_repo: str | None = None
    private: bool = False
    force: bool = False


class ModelJob(BaseModel):
    """One recipe's work as a node sees it."""

    model_config = ConfigDict(frozen=True)

    name: str  # a short label for progress lines
    work_id: str  # names this work folder's tasks on every node
    settings: Settings
    calibration: dict[str, bytes]  # the driver's WORK/calibration files
    node_root: str | None = None


class Measured(BaseModel):
    """A measurement task's result: what the driver writes into WORK, and conversions read."""

    model_config = ConfigDict(frozen=True)

    measurement: bytes
    provenance: bytes
    node: str
    seconds: float


class Converted(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    branch: str
    provenance: BranchProvenance
    node: str
    seconds: float
    skipped: bool
    published: PublishRecord | None  # the node's record of it, copied into the driver's state
    publish_error: BaseException | None


def node_name() -> str:
    return socket.gethostname()


def node_folder(job: ModelJob, task: str) -> Path:
    root = job.node_root or os.environ.get(NODE_WORK_ENV) or str(Path(tempfile.gettempdir()) / "quantkit-cluster")
    return Path(root) / job.work_id / task


def _node_pipeline(job: ModelJob, task: str, listener: Listener | None) -> Pipeline:
    """The task's own work folder on this node, seeded with the driver's calibration set."""
    folder = node_folder(job, task)
    folder.mkdir(parents=True, exist_ok=True)
    p = Pipeline(job.settings, folder, listener=listener)  # fetches the model on this node, or says why not
    p.lock()
    built = calibration.read_set(p.work.calibration)
    if built is None or (built.parquet.read_bytes() != job.calibration.get(calibration.PARQUET_NAME)):
        p.work.calibration.mkdir(parents=True, exist_ok=True)
        for name, data in job.calibration.items():
            write_bytes_atomic(p.work.calibration / name, data)
        built = calibration.read_set(p.work.calibration)
        assert built is not None, "the driver's calibration set did not arrive whole"
    if not p.state.done("calibration"):
        p.state.mark("calibration", "done", sha256=built.manifest.sha256, tokens=built.manifest.tokens)
    return p


def node_measure(job: ModelJob, listener: Listener | None = None) -> Measured:
    """The measurement, on this node."""
    p = _node_pipeline(job, "measure", listener)
    p.measure()
    return Measured(measurement=p.work.measurement.read_bytes(), provenance=p.work.provenance.read_bytes(),
                    node=node_name(), seconds=p.converter_seconds)


def node_convert(job: ModelJob, branch: Branch, measured: Measured, target: TargetSpec | None,
                 card: str | None, listener: Listener | None = None) -> Converted:
    """One branch's conversion on this node, then its publishing from here."""
    p = _node_pipeline(job, f"convert-{branch.name}", listener)
    for path, data in ((p.work.measurement, measured.measurement), (p.work.provenance, measured.provenance)):
        if not path.is_file() or path.read_bytes() != data:
            write_bytes_atomic(path, data)
    if not p.state.done("measure"):
        p.state.mark("measure", "done", sha256=hashlib.sha256(measured.measurement).hexdigest(), node=measured.node)
    result = p.convert(branch)
    record, error = None, None
    if target is not None and card is not None:
        try:
            record = _publish_from_here(p, branch.name, target, card)
        except Exception as exc:  # noqa: BLE001 - the driver records it and reports it with the others
            error = exc if isinstance(exc, QuantkitError) else RuntimeError(f"{type(exc).__name__}: {exc}")
            record = published(p.work.root, branch.name, target.id)
    return Converted(branch=branch.name, provenance=result.provenance, node=node_name(), seconds=result.converter_seconds,
                     skipped=result.skipped, published=record, publish_error=error)


def _publish_from_here(p: Pipeline, branch: str, spec: TargetSpec, card: str) -> PublishRecord | None:
    from quantkit.publish import engine

    card_path = p.work.card
    card_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(card_path, card)
    if spec.git_path is not None:
        target: Any = GitTarget(spec.git_path)
    else:
        from quantkit.publish.hub_target import HubTarget

        assert spec.hub_repo is not None
        target = HubTarget(spec.hub_repo, private=spec.private)
    engine.publish_branch(p.work.root, branch, target, card=card_path, force=spec.force)
    return published(p.work.root, branch, spec.id)


# ---- the Ray side: tasks, the progress relay -----------------------------------------------------------


class _Relay:
    """A Ray actor holding the tasks' progress until the driver takes it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, LogLine | None]] = []

    def put(self, events: list[tuple[str, LogLine | None]]) -> None:
        self.events.extend(events)

    def take(self) -> list[tuple[str, LogLine | None]]:
        out, self.events = self.events, []
        return out


class _Sender:
    """A task's listener: status, warning and error lines, sent to the relay in small batches."""

    def __init__(self, relay: Any, label: str, every: float = 0.5) -> None:
        self.relay, self.label, self.every = relay, label, every
        self.batch: list[tuple[str, LogLine | None]] = []
        self.last = 0.0
        self.lock = threading.Lock()

    def __call__(self, step: str, line: LogLine | None) -> None:
        if line is not None and line.status is None and line.kind not in ("error", "warning"):
            return
        with self.lock:
            self.batch.append((f"{self.label} {step}", line))
            if line is None or time.monotonic() - self.last >= self.every:
                self.flush()

    def flush(self) -> None:
        if self.batch:
            self.relay.put.remote(self.batch)
            self.batch = []
        self.last = time.monotonic()


def _measure_task(job: ModelJob, relay: Any) -> Measured:
    sender = _Sender(relay, job.name)
    try:
        with _node_lock(job, "measure"):
            return node_measure(job, sender)
    finally:
        sender.flush()


def _convert_task(job: ModelJob, branch: Branch, measured: Measured, target: TargetSpec | None, card: str | None,
                  relay: Any) -> Converted:
    sender = _Sender(relay, job.name)
    try:
        with _node_lock(job, f"convert-{branch.name}"):
            return node_convert(job, branch, measured, target, card, sender)
    finally:
        sender.flush()


def _node_lock(job: ModelJob, task: str) -> AbstractContextManager[None]:
    """One attempt at a time in a task's node folder (Ray may start a retry while a lost attempt runs)."""
    folder = node_folder(job, task)
    return work_lock(folder, command_line("cluster task", job.name, task))


def _remotes(ray: ModuleType, max_retries: int) -> tuple[Any, Any, Any]:
    # max_calls=0: Ray retires a GPU task's worker after one task by default, to free GPU memory it may
    # hold; these workers hold none (the converter is their child process), so they are kept for reuse.
    opts = {"num_gpus": 1, "max_retries": max_retries, "retry_exceptions": False, "max_calls": 0}
    return (ray.remote(**opts)(_measure_task), ray.remote(**opts)(_convert_task), ray.remote(num_cpus=0)(_Relay))


# ---- the driver -----------------------------------------------------------------------------------------


class QueueItem(BaseModel):
    """One recipe in the queue."""

    model_config = ConfigDict(frozen=True)

    settings: Settings
    work: Path
    publish: PublishOptions | None = None  # None: the nodes convert and publish nothing


class ItemReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    work: Path
    branches: dict[str, dict[str, Any]]  # branch -> {"achieved_decoder_bpw", "node", "published"}
    target: str


class _Item:
    """The driver's view of one recipe while the queue runs."""

    def __init__(self, q: QueueItem, *, force: bool, node_root: str | None, say: Callable[[str], None]) -> None:
        self.q = q
        self.p = Pipeline(q.settings, q.work, weights=False)
        self.p.lock(force=force)
        self.name = self.p.model.name
        # A bad repo id fails here, before any task.
        self.publisher = Publisher(q.work, q.publish, say=say) if q.publish is not None else None
        self.p.calibration_set()
        files = {f.name: f.read_bytes() for f in sorted(self.p.work.calibration.iterdir()) if f.is_file()}
        work_id = f"{_slug(self.name)}-{hashlib.sha256(str(q.work.resolve()).encode()).hexdigest()[:12]}"
        self.job = ModelJob(name=self.name, work_id=work_id, settings=self.p.settings, calibration=files, node_root=node_root)
        self.measured: Any = None  # the object ref of the measurement, once there is one
        self.card: str | None = None
        self.target: TargetSpec | None = None
        self.results: dict[str, dict[str, Any]] = {}

    def measurement_done(self) -> bool:
        return self.p.state.done("measure") and self.p.work.measurement.is_file() and self.p.work.provenance.is_file()

    def branch_done(self, b: Branch) -> bool:
        if not self.p.state.done(convert_step(b.name)):
            return False
        if self.publisher is None:
            return True
        record = published(self.p.work.root, b.name, self.publisher.target.id)
        return record is not None and record.verified

    def store_measurement(self, m: Measured) -> None:
        # Both files whole (atomic replace), then the state says done: a crash in between redoes the task.
        write_bytes_atomic(self.p.work.measurement, m.measurement)
        write_bytes_atomic(self.p.work.provenance, m.provenance)
        self.p.state.mark("measure", "done", sha256=hashlib.sha256(m.measurement).hexdigest(), node=m.node)

    def check_branches(self) -> None:
        """Every branch reachable with the measurement, before any conversion is queued. The driver
        compares against the bitrates only: its fingerprint of a Hub model (no weights here) is not
        the nodes' (with weights), so the provenance check is the nodes' to make."""
        rng = meas.reachable_range(meas.load_measurement(self.p.work.measurement), self.p.model)
        for b in self.q.settings.branches:
            meas.check_reachable(b.bits, rng)

    def publish_main(self) -> None:
        if self.publisher is None or self.q.publish is None:
            return
        self.publisher.prepare()
        self.publisher.publish_main()
        assert self.publisher.card is not None
        self.card = self.publisher.card.read_text(encoding="utf-8")
        t = self.publisher.target
        self.target = TargetSpec(id=t.id, git_path=t.path if isinstance(t, GitTarget) else None,
                                 hub_repo=getattr(t, "repo_id", None), private=self.q.publish.private, force=self.q.publish.force)

    def store_branch(self, c: Converted) -> None:
        step = convert_step(c.branch)
        self.p.state.mark(step, "done", achieved_decoder_bpw=c.provenance.achieved_decoder_bpw, node=c.node)
        if c.published is not None and self.publisher is not None:
            record = c.published
            set_published(self.p.work.root, c.branch, self.publisher.target.id, lambda _previous: record)
        self.results[c.branch] = {"achieved_decoder_bpw": c.provenance.achieved_decoder_bpw, "node": c.node,
                                  "published": bool(c.published and c.published.verified)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def run_queue(items: list[QueueItem], *, force: bool = False, listener: Listener | None = None,
              say: Callable[[str], None] | None = None, node_root: str | None = None, max_retries: int = 3) -> list[ItemReport]:
    """Run every recipe's measurement and conversions as Ray tasks on the connected cluster (`connect`).

    Every recipe is prepared here first (settings locked, calibration built, the publish target checked),
    so bad input stops the run before any task starts. Then measurements run as soon as a GPU is free,
    each recipe's conversions as soon as its measurement is in, each branch published by its node.

    Raises:
        ClusterTasksFailed: some tasks failed; the others finished and their work is recorded.
        The preparation's errors (SettingsLocked, InvalidRepoId, NotEnoughText, ...), before any task.
    """
    ray = import_ray()
    say = say or (lambda _m: None)
    emit = listener or (lambda _s, _l: None)
    prepared = [_Item(q, force=force, node_root=node_root, say=say) for q in items]
    measure_task, convert_task, relay_cls = _remotes(ray, max_retries)
    relay = relay_cls.remote()
    pending: dict[Any, tuple[str, _Item, Branch | None]] = {}
    failures: dict[str, BaseException] = {}

    def queue_conversions(it: _Item) -> None:
        try:
            it.check_branches()
            it.publish_main()
        except QuantkitError as exc:
            failures[f"{it.name} branches"] = exc
            return
        for b in it.q.settings.branches:
            if it.branch_done(b):
                info = it.p.state.get(convert_step(b.name)).info
                it.results[b.name] = {"achieved_decoder_bpw": info.achieved_decoder_bpw, "node": info.node, "published": it.publisher is not None}
                continue
            it.p.state.mark(convert_step(b.name), "running", bits=b.bits, head_bits=b.head_bits)
            ref = convert_task.remote(it.job, b, it.measured, it.target, it.card, relay)
            pending[ref] = ("convert", it, b)

    for it in prepared:
        if it.measurement_done():
            it.measured = ray.put(Measured(measurement=it.p.work.measurement.read_bytes(),
                                           provenance=it.p.work.provenance.read_bytes(), node="driver", seconds=0.0))
            queue_conversions(it)
        else:
            it.p.state.mark("measure", "running")
            it.measured = measure_task.remote(it.job, relay)
            pending[it.measured] = ("measure", it, None)

    def drain() -> None:
        for step, line in ray.get(relay.take.remote()):
            emit(step, line)

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        drain()
        for ref in ready:
            kind, it, b = pending.pop(ref)
            label = f"{it.name} {'measure' if b is None else convert_step(b.name)}"
            try:
                value = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - recorded, reported with the others; the rest go on
                cause = _cause(exc)
                failures[label] = cause
                it.p.state.mark("measure" if b is None else convert_step(b.name), "failed", error=str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
                say(f"{label} failed: {type(cause).__name__}: {cause}")
                continue
            if kind == "measure":
                it.store_measurement(value)
                say(f"{label} done on {value.node}")
                queue_conversions(it)
            else:
                it.store_branch(value)
                if value.publish_error is not None:
                    failures[f"{label} publish"] = value.publish_error
                say(f"{label} done on {value.node}" + (", published" if value.published and value.published.verified else ""))
    drain()
    if failures:
        raise ClusterTasksFailed(failures)
    return [ItemReport(name=it.name, work=it.q.work, branches=it.results,
                       target=it.publisher.target.id if it.publisher is not None else "nowhere") for it in prepared]


def _cause(exc: BaseException) -> BaseException:
    """The task's own exception out of Ray's wrapper (RayTaskError.cause); Ray's own errors as they are
    (a task that ran out of retries, a lost object)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
