"""`quantkit eval WORK`: every branch against the unquantized model, resumable, in WORK/eval.json.

Layout:
  WORK/eval/tokens.safetensors        the evaluation rows (int32, rows x length)
  WORK/eval/reference/row-*.safetensors  the reference's top-k log-probs per row (computed once)
  WORK/eval/reference.json            the reference's result; its `key` says which text/model/k it is for
  WORK/eval/branches/<branch>.json    one result per branch (done or failed), keyed the same way
  WORK/eval/worker.log                the worker's stderr (exllamav2's own output)
  WORK/eval.json                      the report: text hash, token count, exllamav2 version, per branch
  WORK/eval.svg                       the chart (KL and perplexity against bits and size), published on main

Every result carries a key (the text's sha256, rows x length, the tokenizer, the reference's model
fingerprint and top-k, and for a branch its quantkit.json and shard sizes): a rerun reuses what matches
and recomputes the rest, so a kill anywhere costs at most the task in flight.

The worker (`quantkit.eval.worker`) is a subprocess, the seam tests point elsewhere with
QUANTKIT_EVAL_WORKER (shell words), like QUANTKIT_CONVERTER for the converter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from quantkit.errors import EvalReferenceFailed, NotAnExl2Branch, QuantkitError
from quantkit.eval import CHART_NAME, REPORT_NAME
from quantkit.eval import text as evtext
from quantkit.eval.records import BranchEval, EvalReport, ReferenceInfo, TaskResult, TextInfo, read_result, write

WORKER_ENV = "QUANTKIT_EVAL_WORKER"
REFERENCE = "reference"

ReferenceMode = Literal["auto", "full", "layers", "transformers"]
#: Called with one line to say on screen.
Say = Callable[[str], None]
#: Called with (task, row, rows) as rows finish.
OnRow = Callable[[str, int, int], None]


class EvalSpec(BaseModel):
    """How to evaluate; a recipe's `[eval]` table (or `eval = false`) and `quantkit eval`'s options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    source: str | None = None  # None: the bundled held-out sample
    rows: int = 20
    length: int = 2048
    top_k: int = 100  # reference log-probs kept per token
    reference: ReferenceMode = "auto"
    allow_overlap: bool = False

    @field_validator("rows", "length", "top_k")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        from quantkit.calibration import check_count

        return check_count(info.field_name, v)


# ---- reading a work folder's results ------------------------------------------------------------------


def read_report(work: Path) -> EvalReport | None:
    path = work / REPORT_NAME
    if not path.is_file():
        return None
    try:
        return EvalReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def failed_branches(work: Path) -> list[str]:
    """Branches whose evaluation failed: never published."""
    report = read_report(work)
    return report.failed() if report is not None else []


# ---- the memory plan ----------------------------------------------------------------------------------


def _needs(folder: Path, length: int) -> dict[str, int]:
    """VRAM for the whole model at one row of `length` (no cache), and for its largest module alone."""
    from quantkit.model import load_model
    from quantkit.vram import (CUDA_CONTEXT_BYTES, activation_bytes, decoder_linears, header_weight_bytes,
                               norms_and_biases_bytes)

    m = load_model(folder)
    shape, spec = m.shape, m.spec
    logits = length * shape.vocab * (2 + 4)  # exllamav2's fp16 logits, and their float32 copy
    fixed = activation_bytes(shape, length) + logits + CUDA_CONTEXT_BYTES
    lin = decoder_linears(shape, spec)
    if m.is_exl2 and m.tensors:
        decoder, head, other = header_weight_bytes(m)
        layer = decoder // max(shape.layers, 1)
    else:
        layer = sum(i * o for i, o in lin) * 2
        decoder, head, other = layer * shape.layers, shape.vocab * shape.hidden * 2, norms_and_biases_bytes(shape, spec)
    return {"full": decoder + head + other + fixed, "layers": max(layer, head) + fixed}


# ---- the evaluation -------------------------------------------------------------------------------------


def _same(path: Path, info: TextInfo) -> bool:
    try:
        return TextInfo.model_validate_json(path.read_text(encoding="utf-8")) == info
    except (OSError, ValueError):
        return False


def worker_command() -> list[str]:
    custom = os.environ.get(WORKER_ENV, "").strip()
    return shlex.split(custom) if custom else [sys.executable, "-m", "quantkit.eval.worker"]


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _branch_key(folder: Path) -> str:
    shards = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    qk = folder / "quantkit.json"
    return _sha({"shards": shards, "quantkit": qk.read_text(encoding="utf-8") if qk.is_file() else None})


def check_branch(folder: Path) -> dict[str, Any]:
    """The branch's config.json `quantization_config`, or NotAnExl2Branch naming what is missing."""
    if not folder.is_dir():
        raise NotAnExl2Branch(folder, "no such folder")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise NotAnExl2Branch(folder, "no config.json")
    try:
        qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError) as exc:
        raise NotAnExl2Branch(folder, f"config.json is not JSON ({type(exc).__name__})") from exc
    if qc.get("quant_method") != "exl2":
        raise NotAnExl2Branch(folder, "config.json has no exl2 quantization_config")
    if not any(folder.glob("*.safetensors")):
        raise NotAnExl2Branch(folder, "no *.safetensors")
    return dict(qc)


class Evaluation:
    """One work folder's evaluation: the text, the reference and each branch, cached in WORK/eval/.

    Args:
        work: the work folder.
        source_dir: the unquantized model exllamav2 loads for the reference (the adapter's working copy
            when the model needed one: what the branches were converted from).
        tokenizer_dir: where tokenizer.json and config.json (BOS) are read.
        calibration: the calibration Parquet the evaluation text must not repeat.
    """

    def __init__(self, work: Path, spec: EvalSpec, *, source_dir: Path, tokenizer_dir: Path, fingerprint: str,
                 calibration: Path, say: Say | None = None, on_row: OnRow | None = None) -> None:
        self.work = work
        self.spec = spec
        self.source_dir = source_dir
        self.tokenizer_dir = tokenizer_dir
        self.fingerprint = fingerprint
        self.calibration = calibration
        self.say = say or (lambda _m: None)
        self.on_row = on_row or (lambda _t, _r, _n: None)
        self.dir = work / "eval"
        self._text: TextInfo | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._log: Any = None

    # ---- text and reference ---------------------------------------------------------------------------

    def prepare_text(self) -> TextInfo:
        """Tokenize the evaluation text into WORK/eval/tokens.safetensors (once per text and shape)."""
        if self._text is not None:
            return self._text
        import numpy as np
        from safetensors.numpy import save_file

        s = self.spec
        text = evtext.load_text(s.source)
        tokens = evtext.tokenize(text, self.tokenizer_dir, rows=s.rows, length=s.length)
        warning = evtext.check_overlap(text, tokens.used, self.calibration, allow=s.allow_overlap)
        if warning:
            self.say(f"warning: {warning}")
        info = TextInfo(name=text.name, sha256=text.sha256, rows=len(tokens.rows), length=len(tokens.rows[0]), tokens=tokens.count,
                        tokenizer_sha256=tokens.tokenizer_sha256)
        path = self.dir / "tokens.safetensors"
        meta = self.dir / "tokens.json"
        if not (path.is_file() and meta.is_file() and _same(meta, info)):
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"input_ids": np.asarray(tokens.rows, dtype=np.int32)}, str(tmp))
            tmp.replace(path)
            write(meta, info)
        self._text = info
        return info

    def _key(self) -> str:
        return _sha({"text": self.prepare_text().model_dump(), "model": self.fingerprint, "top_k": self.spec.top_k, "how": self.spec.reference})

    def _ref_done(self) -> TaskResult | None:
        r = read_result(self.dir / "reference.json")
        return r if r is not None and r.key == self._key() and r.status == "done" else None

    def reference(self) -> TaskResult:
        """The reference's result, computed (and its rows cached) when missing.

        Raises:
            EvalReferenceFailed.
        """
        done = self._ref_done()
        if done is not None:
            return done
        (self.dir / "reference.json").unlink(missing_ok=True)  # stale: a result file says the task finished
        task = {"name": REFERENCE, "kind": REFERENCE, "folder": str(self.source_dir), "key": self._key(),
                "mode": self.spec.reference, "top_k": self.spec.top_k, "needs": _needs(self.source_dir, self.spec.length),
                "out": str(self.dir / "reference.json")}
        self._run([task])
        r = read_result(self.dir / "reference.json")
        if r is None or r.key != self._key() or r.status != "done":
            raise EvalReferenceFailed(self.source_dir.name, (r.error if r is not None else None) or "the worker wrote no result")
        return r

    # ---- branches ---------------------------------------------------------------------------------------

    def branches(self, folders: dict[str, Path], *, check: bool = True) -> dict[str, BranchEval]:
        """Each branch's result, reusing cached ones; a branch that fails is a `failed` result, not an error.
        `check=False` takes any folder exllamav2 loads (the unquantized model against itself: KL 0).

        Raises:
            NotAnExl2Branch (before anything runs), EvalReferenceFailed.
        """
        qcs = {name: check_branch(folder) if check else {} for name, folder in folders.items()}
        ref = self.reference()
        todo: list[dict[str, Any]] = []
        results: dict[str, TaskResult] = {}
        for name, folder in folders.items():
            key = _sha({"eval": ref.key, "branch": _branch_key(folder)})
            out = self.dir / "branches" / f"{name}.json"
            cached = read_result(out)
            if cached is not None and cached.key == key:
                results[name] = cached
                continue
            out.unlink(missing_ok=True)
            try:
                needs = _needs(folder, self.spec.length)
            except QuantkitError as exc:  # its headers or config do not read: it cannot load either
                results[name] = TaskResult(name=name, key=key, status="failed", error=f"does not load: {exc}")
                write(out, results[name])
                continue
            todo.append({"name": name, "kind": "branch", "folder": str(folder), "key": key, "mode": "auto",
                         "needs": needs, "out": str(out)})
        if todo:
            self._run(todo)
        for task in todo:
            results[task["name"]] = read_result(Path(task["out"])) or TaskResult(
                name=task["name"], key=task["key"], status="failed", error="the evaluation worker wrote no result")
        evals = {name: self._branch_eval(name, folders[name], qcs[name], results[name]) for name in folders}
        for name, ev in evals.items():
            if ev.status == "failed":
                self.say(f"{name}: evaluation failed ({ev.error}): it will not be published")
        return evals

    @staticmethod
    def _branch_eval(name: str, folder: Path, qc: dict[str, Any], r: TaskResult) -> BranchEval:
        from quantkit.workfolder import read_branch_provenance

        qk = read_branch_provenance(folder)
        figures = r.model_dump(include={"perplexity", "kl_mean", "kl_median", "kl_p99", "top1_agreement"})
        return BranchEval(branch=name, status=r.status, error=r.error, mode=r.mode,
                          bits=qk.bits if qk else qc.get("bits"), head_bits=qk.head_bits if qk else qc.get("head_bits"),
                          achieved_bpw=qk.achieved_decoder_bpw if qk else None,
                          bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")), **figures)

    def _worker(self) -> subprocess.Popen[str]:
        """The worker process, started on first use and again after it died."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        from quantkit.exl2.runtime import exllamav2_env, notice_once

        note = notice_once()
        if note:
            self.say(note)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = (self.dir / "worker.log").open("a", encoding="utf-8")
        self._proc = subprocess.Popen(worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      env=exllamav2_env(), text=True, bufsize=1)
        return self._proc

    def _run(self, tasks: list[dict[str, Any]]) -> None:
        """`tasks` through the worker; when it dies mid-way, the task in flight gets a failed result and a
        new worker takes the rest."""
        remaining = list(tasks)
        while remaining:
            proc = self._worker()
            assert proc.stdin is not None and proc.stdout is not None
            job = {"tokens": str(self.dir / "tokens.safetensors"), "reference": str(self.dir / REFERENCE), "tasks": remaining}
            idle = False
            try:
                proc.stdin.write(json.dumps(job) + "\n")
                proc.stdin.flush()
                while not idle and (line := proc.stdout.readline()):
                    idle = self._event(line) == "idle"
            except BrokenPipeError:
                pass
            if not idle:
                code = proc.wait()
                self._proc = None
                # The first task without a result is the one the worker died in: the others go on.
                dead = next((t for t in remaining if not Path(t["out"]).is_file()), None)
                if dead is not None:
                    write(Path(dead["out"]), TaskResult(name=dead["name"], key=dead["key"], status="failed",
                                                        error=f"the evaluation worker exited with status {code} while on it "
                                                              f"(log: {self.dir / 'worker.log'})"))
            remaining = [t for t in remaining if not Path(t["out"]).is_file()]

    def close(self) -> None:
        """End the worker (it exits when its stdin closes)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.close()
                proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Evaluation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, line: str) -> str | None:
        try:
            ev = json.loads(line)
        except ValueError:
            return None
        if ev.get("event") == "plan":
            what = "the unquantized model" if ev["task"] == REFERENCE else ev["task"]
            how = {"full": "exllamav2, whole model", "layers": "exllamav2, module by module",
                   "transformers": "transformers on the CPU", "none": "not evaluated"}.get(ev["mode"], ev["mode"])
            self.say(f"eval {what}: {how} ({ev['why']})")
        elif ev.get("event") == "row":
            self.on_row(ev["task"], int(ev["row"]), int(ev["rows"]))
        return str(ev.get("event"))

    # ---- the report -------------------------------------------------------------------------------------

    def report(self, evals: dict[str, BranchEval]) -> EvalReport:
        """Merge `evals` into WORK/eval.json (branches evaluated earlier stay) and redraw the chart."""
        from quantkit.eval.chart import write_chart

        ref = self.reference()
        old = read_report(self.work)
        text = self.prepare_text()
        branches = dict(old.branches) if old is not None and old.text == text and old.top_k == self.spec.top_k else {}
        branches.update(evals)
        report = EvalReport(text=text, exllamav2_version=ref.exllamav2_version, top_k=self.spec.top_k,
                            reference=ReferenceInfo(model=self.source_dir.name, mode=ref.mode, perplexity=ref.perplexity),
                            branches=dict(sorted(branches.items(), key=lambda kv: -(kv[1].bits or 0))))
        write(self.work / REPORT_NAME, report)
        write_chart(report, self.work / CHART_NAME)
        return report



# ---- from a pipeline / a work folder ----------------------------------------------------------------------


def for_pipeline(p: Any, spec: EvalSpec, *, say: Say | None = None, on_row: OnRow | None = None) -> Evaluation:
    """The evaluation of `p`'s work folder (a `quantkit.pipeline.Pipeline`). The reference is what the
    branches were converted from: the adapter's working copy when the model needed one."""
    source = p.converter_input() if p.adapter is not None else p.model_dir
    write(p.work.root / "eval" / "spec.json", spec)
    return Evaluation(p.work.root, spec, source_dir=source, tokenizer_dir=p.model_dir, fingerprint=p.fingerprint,
                      calibration=p.work.calibration / "calibration.parquet", say=say, on_row=on_row)


def recorded_spec(work: Path) -> EvalSpec | None:
    """The spec the last evaluation of `work` used (what `quantkit run` wrote), as defaults for `quantkit eval`."""
    try:
        return EvalSpec.model_validate_json((work / "eval" / "spec.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_work(work: Path) -> Any:
    """The Pipeline of an existing work folder, from its recipe.json.

    Raises:
        WorkFolderIncomplete: no recipe.json (nothing was measured or converted there).
    """
    from quantkit.errors import WorkFolderIncomplete
    from quantkit.pipeline import Pipeline
    from quantkit.workfolder import read_settings

    record = read_settings(work)
    if record is None:
        raise WorkFolderIncomplete(work, "no recipe.json", "run `quantkit run RECIPE` or `quantkit measure MODEL --work WORK` first")
    return Pipeline(record.settings, work)


def evaluate_branch(evaluation: Evaluation, branch: str, folder: Path) -> BranchEval:
    """One branch, merged into WORK/eval.json at once (so a kill later keeps it)."""
    result = evaluation.branches({branch: folder})[branch]
    evaluation.report({branch: result})
    return result
