"""The work folder and its steps: calibration -> measurement -> one conversion per bitrate -> publish.

The folder's layout and the records kept in it are `quantkit.workfolder`.

Every step is idempotent: a rerun after a kill anywhere finds the finished parts done (state.json,
job_new.json) and goes on. Settings that would invalidate finished work are locked (`lock`).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from quantkit import calibration, guards
from quantkit.branches import Branch
from quantkit.errors import (
    DiskTooSmall,
    MeasurementMissing,
    NotEnoughText,
    NoWeights,
    SettingsLocked,
    WorkFolderMismatch,
)
from quantkit.exl2 import converter as conv
from quantkit.exl2 import finalize as fin
from quantkit.exl2 import measurement as meas
from quantkit.exl2.job import JOB_FILE
from quantkit.exl2.resources import StepNeeds, adapt_needs, convert_needs, measure_needs
from quantkit.exl2.status import LogLine
from quantkit.model import Model, load_model
from quantkit.source import SourceRecord, identify, published_name
from quantkit.workfolder import (
    AdapterRecord,
    BranchCalibration,
    BranchProvenance,
    MeasurementProvenance,
    Settings,
    SettingsRecord,
    State,
    StepState,
    Work,
    convert_step,
    read_branch_provenance,
    read_settings,
    write_record,
)

__all__ = ["BranchResult", "Listener", "Pipeline", "Settings", "State", "StepState", "Work", "convert_step"]

#: Called with (step name, console line) for every converter line, and with (step, None) on step start.
Listener = Callable[[str, LogLine | None], None]


class BranchResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    folder: Path
    provenance: BranchProvenance
    converter_seconds: float
    skipped: bool


class Pipeline:
    """One model in one work folder. `converter` is the seam (tests pass one pointed at the double).

    Constructing it reads the source's config and tensor headers only (a Hub model's from the Hub), so
    a dry run plans without weights. The first step that needs them (`lock`, or any step) fetches a Hub
    model's weights and checks that safetensors are there: `local_weights()`.
    """

    def __init__(self, settings: Settings, work: Path, *, converter: conv.Converter | None = None,
                 listener: Listener | None = None, model: Model | None = None, weights: bool = True,
                 keep_temp: bool = False) -> None:
        """`weights=False`: this machine only plans, calibrates and keeps the state (a cluster driver,
        quantkit.cluster): a Hub model's config and tokenizer are fetched here, never its weights.
        `keep_temp`: keep the converter's scratch (out_tensor, calibration states) after a step is
        finished and verified."""
        self.settings = settings
        self.weights = weights
        self.keep_temp = keep_temp
        self.work = Work(work)
        self.converter = converter or conv.Converter()
        self.listener = listener
        self.model = model or load_model(settings.model)
        guards.check_work_folder(work, self.model.path)  # before anything reads or writes WORK
        for b in settings.branches:  # each branch's folders resolve inside WORK (Work checks them)
            self.work.job(b.name), self.work.out(b.name)
        #: The adapter's plan (load_model ran its check, so an unmappable config is already refused).
        self.adapter = self.model.adapter
        self.state = State(self.work)
        self._model_dir: Path | None = None
        self._fingerprint: str | None = None
        self._input: Path | None = None
        #: Seconds spent inside the converter subprocess, for the overhead figure.
        self.converter_seconds = 0.0
        self._seconds_lock = threading.Lock()

    def has_local_weights(self) -> bool:
        """The safetensors are on this machine already: reading them downloads nothing."""
        return self.model.path is not None and any(self.model.path.glob("*.safetensors"))

    def local_weights(self) -> Path:
        """The folder holding the safetensors the converter reads; a Hub model's are downloaded first.

        Raises:
            NoWeights: the folder holds no safetensors (exllamav2 converts nothing else).
        """
        if self._model_dir is None and not self.weights:
            # The fingerprint stays the one of `self.model` as loaded (a Hub model's: config and headers).
            self._model_dir = self.model.path or self._fetch_light(self.model)
            guards.check_work_folder(self.work.root, self._model_dir)
        if self._model_dir is None:
            if self.model.path is None:
                self.model = self._download(self.model)
                guards.check_work_folder(self.work.root, self.model.path)  # the Hub snapshot, now it is known
            assert self.model.path is not None
            if not any(self.model.path.glob("*.safetensors")):
                raise NoWeights(self.model.path, "*.safetensors: exllamav2 converts only safetensors checkpoints")
            self._model_dir = self.model.path
        return self._model_dir

    @property
    def model_dir(self) -> Path:
        return self.local_weights()

    @property
    def source_name(self) -> str:
        """How the files that are published (provenance, quantkit.json) name the source: never a local path."""
        return self.source().hub_id or published_name(self.settings.model, self.model_dir)

    @property
    def fingerprint(self) -> str:
        """The user's source model's, adapter or not: a rerun on the same source matches its work."""
        if self._fingerprint is None:
            self.local_weights()
            self._fingerprint = meas.model_fingerprint(self.model)
        return self._fingerprint

    @staticmethod
    def _fetch_light(model: Model) -> Path:
        """A Hub model's config and tokenizer files, without its weights."""
        from quantkit import hub

        return Path(hub.get_hf_api().snapshot_download(model.ref, allow_patterns=["*.json", "*.txt", "*.model", "*.jinja"]))

    @staticmethod
    def _download(model: Model) -> Model:
        """exllamav2 converts a local folder: fetch a Hub model's weights and tokenizer through the seam."""
        from quantkit import hub

        path = hub.get_hf_api().snapshot_download(model.ref, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        return load_model(path)

    # ---- settings ------------------------------------------------------------------------------------

    def lock(self, *, force: bool = False) -> None:
        """Record the settings, refusing changes that would invalidate finished work unless `force`, in
        which case the invalidated steps are reset (their converter folders removed: that is the point).

        Raises:
            WorkFolderMismatch, SettingsLocked.
        """
        self.work.root.mkdir(parents=True, exist_ok=True)
        new = self.settings
        recorded = read_settings(self.work.root)
        if recorded is not None:
            if recorded.model_fingerprint != self.fingerprint:
                raise WorkFolderMismatch(self.work.root, recorded.settings.model, new.model)
            old = recorded.settings
            resets: list[str] = []
            for field in ("calibration", "calibration_source", "measurement_rows", "length"):
                if getattr(old, field) != getattr(new, field) and self.state.get("calibration").status != "pending":
                    self._locked(field, getattr(old, field), getattr(new, field), force, resets, ["calibration", "measure"] + self._done_branches())
            if old.rows != new.rows and self._done_branches():
                self._locked("rows", old.rows, new.rows, force, resets, self._done_branches())
            known = {b.name: b for b in old.branches}
            for b in new.branches:
                o = known.get(b.name)
                if o is not None and (o.bits, o.head_bits) != (b.bits, b.head_bits) and self.state.done(convert_step(b.name)):
                    self._locked(f"branch {b.name}", f"{o.bits:g}/{o.head_bits}", f"{b.bits:g}/{b.head_bits}", force, resets, [convert_step(b.name)])
            for step in dict.fromkeys(resets):
                self._reset(step)
            merged = {b.name: b for b in old.branches} | {b.name: b for b in new.branches}
            new = new.model_copy(update={"branches": list(merged.values())})
        write_record(self.work.settings, SettingsRecord(settings=new, model_fingerprint=self.fingerprint, model_dir=str(self.model_dir),
                                                      source=self.source()))

    def source(self) -> SourceRecord:
        """The source as the work folder records it: absolute path, Hub id and revision when known."""
        found = identify(self.settings.model, self.model_dir)
        if self.settings.base_model is not None:
            found = found.model_copy(update={"hub_id": self.settings.base_model, "how": None})
        return found

    def _done_branches(self) -> list[str]:
        return [k for k, v in self.state.steps.items() if k.startswith("convert:") and v.status != "pending"]

    @staticmethod
    def _locked(field: str, old: Any, new: Any, force: bool, resets: list[str], steps: list[str]) -> None:
        if not force:
            raise SettingsLocked(field, old, new)
        resets.extend(steps)

    def _reset(self, step: str) -> None:
        if step == "calibration":
            shutil.rmtree(self.work.calibration, ignore_errors=True)
        elif step == "measure":
            shutil.rmtree(self.work.measure, ignore_errors=True)
            self.work.measurement.unlink(missing_ok=True)
            self.work.provenance.unlink(missing_ok=True)
        elif step.startswith("convert:"):
            name = step.split(":", 1)[1]
            shutil.rmtree(self.work.job(name), ignore_errors=True)
            shutil.rmtree(self.work.out(name), ignore_errors=True)
        self.state.reset(step)

    # ---- checks before GPU work ----------------------------------------------------------------------

    def check_disk(self, needs: list[StepNeeds]) -> None:
        self.work.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.work.root).free
        needed = sum(n.disk_bytes for n in needs)
        if needed > free:
            raise DiskTooSmall(self.work.root, needed, free)

    def _emit(self, step: str, line: LogLine | None) -> None:
        if self.listener is not None:
            self.listener(step, line)

    # ---- steps ---------------------------------------------------------------------------------------

    def calibration_set(self) -> calibration.CalibrationSet:
        """Build (or reuse) WORK/calibration for the largest pass: rows x length tokens."""
        s = self.settings
        built = calibration.read_set(self.work.calibration)
        if built is not None and self.state.done("calibration"):
            self._check_tokens(built)
            return built
        self._emit("calibration", None)
        self.state.mark("calibration", "running")
        recipe, base = calibration.load_recipe(s.calibration, source=s.calibration_source,
                                               rows=max(s.rows, s.measurement_rows), length=s.length)
        built = calibration.build(recipe, base, self.model_dir, self.work.calibration)
        self.state.mark("calibration", "done", sha256=built.manifest.sha256, tokens=built.manifest.tokens)
        return built

    def _check_tokens(self, built: calibration.CalibrationSet) -> None:
        s = self.settings
        for rows in (s.rows, s.measurement_rows):
            if built.manifest.tokens < rows * s.length:
                raise NotEnoughText(str(built.parquet), built.manifest.tokens, rows, s.length)

    # ---- the architecture adapter ---------------------------------------------------------------

    def adapter_record(self) -> AdapterRecord | None:
        """What measurement.provenance.json and each quantkit.json record about the adapter."""
        a = self.adapter
        if a is None:
            return None
        return AdapterRecord(adapter=a.adapter, source_arch=a.source_arch, target_arch=a.target_arch, status=a.status,
                             experimental=a.experimental, exact=a.exact, summary=a.summary())

    def convert_needs(self, branch: Branch) -> StepNeeds:
        """Disk, RAM and VRAM one branch's conversion needs, with this run's calibration settings."""
        s = self.settings
        return convert_needs(self.model, bits=branch.bits, head_bits=branch.head_bits, rows=s.rows, length=s.length)

    def adapt_needs(self) -> StepNeeds | None:
        """The working copy's disk and RAM, from the local shards' headers; None without an adapter or
        before the weights are local."""
        if self.adapter is None or not self.has_local_weights():
            return None
        from quantkit.archs import adapters
        from quantkit.archs.adapters import workcopy

        adapter = adapters.get(self.adapter.source_arch)
        assert adapter is not None
        return adapt_needs(workcopy.disk_need(adapter, self.model_dir, self.work.adapted), shard_bytes=workcopy.SHARD_BYTES)

    @property
    def input_dir(self) -> Path:
        """The folder the converter reads (`-i`); `converter_input()` makes sure it is there."""
        return self.model_dir if self.adapter is None else self.work.adapted

    def converter_input(self) -> Path:
        """The converter's `-i`: the user's folder, or the adapter's working copy in WORK/adapted, written
        once (reused while complete and current, rebuilt otherwise) through the adapter's atomic write."""
        if self.adapter is None:
            return self.model_dir
        if self._input is not None:
            return self._input
        from quantkit.archs import adapters
        from quantkit.archs.adapters import workcopy

        dst = self.work.adapted
        recorded = self.state.get("adapt").info.model_fingerprint
        if recorded == self.fingerprint and workcopy.is_current(dst, self.model_dir, self.adapter):
            if not self.state.done("adapt"):
                self.state.mark("adapt", "done")
        else:
            needs = self.adapt_needs()
            assert needs is not None
            self.check_disk([needs])
            self._emit("adapt", None)
            self.state.mark("adapt", "running", adapter=self.adapter.adapter, model_fingerprint=self.fingerprint)
            try:
                copy = adapters.prepare(self.model_dir, dst)
            except Exception:
                self.state.mark("adapt", "failed")
                raise
            self.state.mark("adapt", "done", written_bytes=copy.written_bytes, files=len(copy.files))
        self._input = dst
        return dst

    def measure(self) -> MeasurementProvenance:
        """The one measurement pass (`-om`), resumed when its job folder survives."""
        s = self.settings
        cal = self.calibration_set()
        job = conv.MeasureJob(model_dir=self.input_dir, work_dir=self.work.measure, measurement=self.work.measurement,
                              calibration=cal.parquet, rows=s.measurement_rows, length=s.length)
        if self.state.done("measure") and self.work.provenance.is_file():
            prov = meas.read_provenance(self.work.measurement)
            meas.check_provenance(self.work.measurement, prov, fingerprint=self.fingerprint)
            self.remove_scratch(job)
            return prov
        if not conv.is_finished(job):
            conv.preflight()
            self.check_disk([measure_needs(self.model, rows=s.measurement_rows, length=s.length)])
            self.converter_input()
        self._emit("measure", None)
        self.state.mark("measure", "running")
        try:
            result = self.converter.run(job, on_line=lambda line: self._emit("measure", line))
        except Exception:
            self.state.mark("measure", "failed")
            raise
        self.converter_seconds += result.seconds
        meas.load_measurement(self.work.measurement)  # refuse a file exllamav2 would choke on later
        prov = meas.make_provenance(self.source_name, self.fingerprint, measurement=self.work.measurement,
                                    calibration=cal.manifest.name, calibration_sha256=cal.manifest.sha256,
                                    rows=s.measurement_rows, length=s.length, exllamav2_version=conv.converter_version(),
                                    adapter=self.adapter_record())
        write_record(self.work.provenance, prov)
        self.state.mark("measure", "done", sha256=prov.measurement_sha256)
        self.remove_scratch(job)
        return prov

    def remove_scratch(self, job: conv.Job) -> list[str]:
        """Delete a finished job's scratch in its -o folder (out_tensor, calibration and hidden states:
        several times the branch's size on a real model) once its outputs are verified; its job file
        stays, so a rerun still finds the step finished. Nothing when `keep_temp`. Returns what went."""
        if self.keep_temp or not conv.is_finished(job):
            return []
        removed = []
        for p in sorted(job.work_dir.iterdir()):
            if p.name == JOB_FILE:  # small, and what says the step finished (the log lies beside -o)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        return removed

    def analysis(self) -> tuple[meas.Measurement, meas.BitRange, MeasurementProvenance]:
        """The recorded measurement, checked against this model, and the bitrates it reaches.

        Raises:
            MeasurementMissing, MeasurementCorrupt, MeasurementMismatch.
        """
        if not self.work.measurement.is_file():
            raise MeasurementMissing(self.work.root)
        prov = meas.read_provenance(self.work.measurement)
        meas.check_provenance(self.work.measurement, prov, fingerprint=self.fingerprint)
        m = meas.load_measurement(self.work.measurement)
        return m, meas.reachable_range(m, self.model), prov

    def check_branches(self, branches: list[Branch]) -> meas.BitRange:
        """Every branch reachable with the measurement, before any conversion starts."""
        _m, rng, _p = self.analysis()
        for b in branches:
            meas.check_reachable(b.bits, rng)
        return rng

    def convert_job(self, branch: Branch) -> conv.ConvertJob:
        """The converter job for one bitrate (the calibration set must exist: `calibration_set()`)."""
        s = self.settings
        return conv.ConvertJob(model_dir=self.input_dir, work_dir=self.work.job(branch.name), measurement=self.work.measurement,
                               output_dir=self.work.out(branch.name), bits=branch.bits, head_bits=branch.head_bits,
                               calibration=self.work.calibration / calibration.PARQUET_NAME, rows=s.rows, length=s.length)

    def convert(self, branch: Branch, *, converter: conv.Converter | None = None) -> BranchResult:
        """One bitrate from the measurement into WORK/out/<branch>, resumed when its job folder survives.

        `converter` replaces the pipeline's own for this call: quantkit.parallel gives each branch one
        pinned to its GPU, so several branches can convert at once from threads.
        """
        s = self.settings
        cal = self.calibration_set()
        _m, rng, prov = self.analysis()
        meas.check_reachable(branch.bits, rng)
        step = convert_step(branch.name)
        out = self.work.out(branch.name)
        job = self.convert_job(branch)
        done = read_branch_provenance(out) if self.state.done(step) and conv.is_finished(job) else None
        if done is not None:
            self.remove_scratch(job)  # a run killed between finishing and cleaning up
            return BranchResult(branch=branch.name, folder=out, provenance=done, converter_seconds=0.0, skipped=True)
        if not conv.is_finished(job):
            conv.preflight()
            self.check_disk([self.convert_needs(branch)])
            self.converter_input()
        self._emit(step, None)
        self.state.mark(step, "running", bits=branch.bits, head_bits=branch.head_bits)
        try:
            result = (converter or self.converter).run(job, on_line=lambda line: self._emit(step, line))
        except Exception:
            self.state.mark(step, "failed")
            raise
        with self._seconds_lock:
            self.converter_seconds += result.seconds
        head_weights = self.model.shape.hidden * self.model.shape.vocab
        achieved = fin.achieved_bits(out, decoder_weights=rng.decoder_weights, head_weights=head_weights)
        record = BranchProvenance(
            branch=branch.name, bits=branch.bits, head_bits=branch.head_bits,
            achieved_decoder_bpw=round(achieved.decoder_bpw, 4), achieved_head_bpw=round(achieved.head_bpw, 4),
            bytes=achieved.bytes, reachable_bpw=(round(rng.low, 4), round(rng.high, 4)),
            measurement_sha256=prov.measurement_sha256, source_model=self.source_name, model_fingerprint=self.fingerprint,
            calibration=BranchCalibration(name=cal.manifest.name, sha256=cal.manifest.sha256, rows=s.rows, length=s.length,
                                          measurement_rows=prov.rows, measurement_length=prov.length),
            exllamav2_version=conv.converter_version(), adapter=self.adapter_record(),
        )
        written = fin.finalize(out, record, source_dir=self.input_dir)
        self.state.mark(step, "done", achieved_decoder_bpw=record.achieved_decoder_bpw)
        self.remove_scratch(job)
        return BranchResult(branch=branch.name, folder=out, provenance=written, converter_seconds=result.seconds, skipped=result.skipped)
