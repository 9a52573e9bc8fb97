"""`quantkit run RECIPE.toml`: one file names model, calibration, branches; the steps run in order
(calibration -> measure -> convert each -> publish each) through the file-backed `Pipeline`.

A recipe:
    model = "path/or/hub-id"
    work = "work/llama3"             # optional; --work overrides
    calibration = "default"          # a recipe name in calibration/, or a file
    rows = 100                       # quantization pass
    measurement_rows = 16
    length = 2048
    branches = "default"             # or a branch-set file, or inline [[branch]] tables ([[branches]] too)

    base_model = "org/model"         # optional: the source's Hub id, when `model` is a folder that does not say

    eval = false                     # optional: no evaluation; or an [eval] table (rows, length, source, top_k)

    [publish]                        # optional: without it the run converts and publishes nothing
    repo = "alice/Llama-3-8B-exl2"   # the Hub repo (needs a token); private = true to create it private
    # to = "exl2-repo"               # or a local git repository (relative to the recipe)
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from quantkit import EXLLAMAV2_VERSION, guards
from quantkit.branches import branches_from_tables, default_branches, load_branch_file
from quantkit.errors import QuantkitError, RecipeUnknownKey, RecipeUnreadable
from quantkit.exl2.resources import StepNeeds, measure_needs
from quantkit.model import Model
from quantkit.parallel import SlotPlan, convert_parallel
from quantkit.pipeline import BranchResult, Pipeline, Settings, convert_step
from quantkit.plan import make_plan
from quantkit.eval.core import EvalSpec, Evaluation, evaluate_branch
from quantkit.publish import BackgroundPublisher, PublishOptions, choose_target
from quantkit.publish.engine import published
from quantkit.units import format_gib
from quantkit.vram import CacheMode

DRY_RUN_CONTEXT = 4096


class RunRecipe(BaseModel):
    model_config = ConfigDict(frozen=True)

    settings: Settings
    work: Path | None
    publish: PublishOptions | None = None  # None: the recipe has no [publish] table
    eval: EvalSpec = EvalSpec()


#: What a recipe's [publish] table may set; the other PublishOptions are the command's flags.
PUBLISH_KEYS = ("repo", "private", "to", "prompt_format")


def load_run_recipe(path: Path) -> RunRecipe:
    """Raises: RecipeUnreadable (and the validation errors of its values)."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeUnreadable(path, "no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeUnreadable(path, f"not valid TOML ({str(exc).splitlines()[0]})") from exc
    if "model" not in data:
        raise RecipeUnreadable(path, "it names no model (model = \"folder or hub id\")")
    known = [k for k in Settings.model_fields if k != "branches"] + ["work", "branches", "publish", "eval"]
    for key in data:
        if key not in known and key != "branch":
            raise RecipeUnknownKey(path, key, "the recipe", known)
    if "branch" in data and "branches" in data:
        raise RecipeUnreadable(path, "it has both `branch` and `branches`: use one ([[branch]] tables, or branches = \"set\")")
    # [[branch]] is how branches/default.toml and the docs write a table; [[branches]] is read the same.
    raw = data.pop("branch", None) if "branch" in data else data.pop("branches", "default")
    if raw == "default":
        branches = default_branches()
    elif isinstance(raw, str):
        branches = load_branch_file((path.parent / raw) if not Path(raw).is_absolute() else Path(raw))
    elif isinstance(raw, list):
        branches = branches_from_tables(raw, file=path, table="[[branch]]")
    else:
        raise RecipeUnreadable(path, "branches must be a branch-set name or file, or [[branch]] tables")
    work = data.pop("work", None)
    publish = _publish_spec(path, data.pop("publish")) if "publish" in data else None
    evaluation = _eval_spec(path, data.pop("eval", True))
    model = data["model"]
    if not isinstance(model, str):
        raise RecipeUnreadable(path, "model must be a string (a folder or a Hub id)")
    if not Path(model).is_absolute() and (path.parent / model).is_dir():
        data["model"] = str((path.parent / model).resolve())
    try:
        settings = Settings(**data, branches=branches)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecipeUnreadable(path, f"bad settings ({'.'.join(str(x) for x in first['loc'])}: {first['msg']})") from exc
    if work is not None and not isinstance(work, str):
        raise RecipeUnreadable(path, "work must be a string (a folder)")
    return RunRecipe(settings=settings, work=(path.parent / work) if work else None, publish=publish, eval=evaluation)


def _eval_spec(path: Path, raw: Any) -> EvalSpec:
    if isinstance(raw, bool):
        return EvalSpec(enabled=raw)
    if not isinstance(raw, dict):
        raise RecipeUnreadable(path, "eval must be true, false or a table: [eval] with rows, length, source, top_k")
    try:
        return EvalSpec(**raw)
    except ValidationError as exc:
        raise RecipeUnreadable(path, f"bad [eval] ({exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']})") from exc


def _publish_spec(path: Path, raw: Any) -> PublishOptions:
    if not isinstance(raw, dict):
        raise RecipeUnreadable(path, "publish must be a table: [publish] with repo = \"USER/NAME\" or to = \"folder\"")
    for key in raw:
        if key not in PUBLISH_KEYS:
            raise RecipeUnknownKey(path, key, "[publish]", list(PUBLISH_KEYS))
    try:
        spec = PublishOptions(**raw)
    except ValidationError as exc:
        raise RecipeUnreadable(path, f"bad [publish] ({exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']})") from exc
    if spec.to is not None and not spec.to.is_absolute():
        spec = spec.model_copy(update={"to": path.parent / spec.to})
    return spec


def publish_options(recipe: PublishOptions | None, *, repo: str | None = None, to: Path | None = None, private: bool = False,
                    force: bool = False, base_model: str | None = None, no_base_model: bool = False) -> PublishOptions | None:
    """The recipe's [publish] table with the command's flags over it; None when neither names a Hub
    repo or a local repository (the run then publishes nothing)."""
    options = recipe or PublishOptions()
    update: dict[str, Any] = {k: v for k, v in {"repo": repo, "to": to, "base_model": base_model}.items() if v is not None}
    update |= {k: True for k, v in {"private": private, "force": force, "no_base_model": no_base_model}.items() if v}
    options = options.model_copy(update=update)
    return options if options.repo is not None or options.to is not None else None


def check_run_paths(r: RunRecipe, work: Path) -> None:
    """The recipe's folders against the model folder, before any work: WORK, and [publish] to.

    Raises:
        PathOverlapsModel.
    """
    model_dir = guards.local_model_dir(r.settings.model)
    guards.check_work_folder(work, model_dir)
    guards.refuse_overlap(r.publish.to if r.publish is not None else None, model_dir, what="[publish] to")


class DryStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: str
    status: str
    needs: StepNeeds | None
    inference_vram_bytes: int | None = None  # loading the result at DRY_RUN_CONTEXT, FP16 cache
    note: str | None = None


class DryRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    steps: list[DryStep]
    reachable: tuple[float, float] | None  # from the measurement, when there is one
    unreachable: list[str]
    note: str
    publish_target: str
    publish_warnings: list[str]
    needs: list[str] = []  # what a real run needs that planning did not: weights, GPU, disk


def dry_run(p: Pipeline, publish: PublishOptions | None = None) -> DryRun:
    """The plan without running anything: steps with their state, disk/RAM/VRAM, reachable bitrates, and
    where it publishes (`publish`: the recipe's [publish] table with the command's flags; None: nowhere)."""
    s = p.settings
    m: Model = p.model
    steps = [DryStep(step="calibration", status=p.state.get("calibration").status, needs=None)]
    if p.adapter is not None:  # the working copy the converter reads, in WORK/adapted
        steps.append(DryStep(step="adapt", status=p.state.get("adapt").status, needs=p.adapt_needs(), note=p.adapter.summary()))
    steps.append(DryStep(step="measure", status=p.state.get("measure").status,
                         needs=measure_needs(m, rows=s.measurement_rows, length=s.length)))
    plan = make_plan(m, s.branches, [DRY_RUN_CONTEXT], [CacheMode.FP16]) if s.branches else None
    infer = {r.branch: r.total_bytes for r in plan.rows} if plan else {}
    for b in s.branches:
        steps.append(DryStep(step=convert_step(b.name), status=p.state.get(convert_step(b.name)).status,
                             needs=p.convert_needs(b),
                             inference_vram_bytes=infer.get(b.name)))
    target, warnings = "nowhere: the recipe has no publish table (add [publish], or pass --repo / --to)", []
    if publish is not None:
        try:
            choice = choose_target(publish)
        except QuantkitError as exc:  # said, not raised: the plan is still worth seeing
            target, warnings = f"{publish.repo or publish.to}", [f"a real run stops before converting: {exc}"]
        else:
            target, warnings = choice.target.id, choice.warnings
            names = [b.name for b in s.branches]
            for name in names[:1] + ["main"] + names[1:]:  # main goes out with the first branch, never before
                steps.append(DryStep(step=f"publish:{name}", status=_published_status(p.work.root, name, target), needs=None))
    reachable = None
    unreachable: list[str] = []
    note = "reachable bitrates are known once the measurement exists"
    if p.work.measurement.is_file() and not p.has_local_weights():
        note = "reachable bitrates are checked against the model once its weights are here"
    elif p.work.measurement.is_file():
        try:
            _meas, rng, _prov = p.analysis()
            reachable = (rng.low, rng.high)
            unreachable = [b.name for b in s.branches if not rng.contains(b.bits)]
            note = "reachable bitrates from the measurement"
        except QuantkitError:
            pass
    return DryRun(steps=steps, reachable=reachable, unreachable=unreachable, note=note,
                  publish_target=target, publish_warnings=warnings, needs=run_needs(p, steps))


def run_needs(p: Pipeline, steps: list[DryStep]) -> list[str]:
    """What a real run needs beyond what planning read: the weights, a GPU with exllamav2, the disk."""
    m = p.model
    said: list[str] = []
    weights = sum(t.nbytes for t in m.tensors.values())
    if m.path is None:
        size = f"{format_gib(weights)} of" if weights else "its"
        said.append(f"weights: {size} safetensors, downloaded from the Hub ({m.ref}) into the Hugging Face cache")
    elif not p.has_local_weights():
        said.append(f"weights: {m.path} holds no *.safetensors; put the model's safetensors shards there "
                    "(exllamav2 converts only safetensors)")
    if p.adapter is not None and not p.has_local_weights():
        said.append("adapt: its disk need is known once the weights are here")
    pending = [x.needs for x in steps if x.needs is not None and not x.status.startswith("done")]
    if any(n.vram_bytes for n in pending):
        vram = max(n.vram_bytes for n in pending)
        said.append(f"GPU: an NVIDIA GPU with about {format_gib(vram)} free and exllamav2 {EXLLAMAV2_VERSION} "
                    "(pip install exllamav2==0.3.2)")
    if pending:
        # Each step's scratch is freed before the next, except the outputs; the largest step bounds it.
        said.append(f"disk: {format_gib(max(n.disk_bytes for n in pending))} free in {p.work.root} for the largest step")
    return said


def _published_status(work: Path, branch: str, target_id: str) -> str:
    record = published(work, branch, target_id)
    if record is None:
        return "pending"
    if record.verified:
        return f"done ({(record.commit or '')[:10]})".replace(" ()", "")
    return f"failed: {record.error or 'unknown'}"


def run_all(p: Pipeline, publisher: BackgroundPublisher | None = None, evaluation: Evaluation | None = None, *,
            slots: SlotPlan | None = None) -> list[BranchResult]:
    """calibration -> measure -> (all branches checked reachable) -> convert each, and with a publisher:
    its pre-flight before any of it, then each branch uploading while the next one converts (`main`
    with the first).

    With `slots` (quantkit.parallel), the branches convert side by side, one per GPU, and each is
    handed to the publisher as it finishes.

    With an evaluation, the reference logits come right after the measurement and each branch is
    evaluated once converted, before it is handed over (on this thread): one that fails to load or gives
    non-finite logits is never published, and the run goes on with the others. Each landing renders the
    card from the work folder, so main's card carries the KL/PPL of the branches listed, and main gets
    eval.json and the chart.

    An upload that failed is raised (PublishFailed) after the conversion in flight finishes; the
    worker is joined before this returns or raises.
    """

    def prepare() -> None:
        p.calibration_set()
        p.measure()
        p.check_branches(p.settings.branches)
        if evaluation is not None:
            evaluation.reference()

    def passes(r: BranchResult) -> bool:
        """Evaluate a converted branch; whether it may be published."""
        if evaluation is None:
            return True
        ev = evaluate_branch(evaluation, r.branch, r.folder)
        p.state.mark(f"eval:{r.branch}", ev.status, **({"error": ev.error} if ev.error else {"kl_mean": ev.kl_mean}))
        return ev.status == "done"

    def hand_over(r: BranchResult) -> None:
        ok = passes(r)
        if publisher is not None:
            publisher.check()  # an earlier upload failed: start no further conversion
            if ok:
                publisher.submit(r.branch)

    def convert_all() -> list[BranchResult]:
        if slots is not None:
            return convert_parallel(p, p.settings.branches, slots, on_done=hand_over)
        results = []
        for b in p.settings.branches:
            results.append(p.convert(b))
            hand_over(results[-1])
        return results

    if publisher is None:
        prepare()
        return convert_all()
    with publisher:
        # Before any work: a token that cannot write, or a Hub publish without base_model, stops the run now.
        publisher.begin()
        prepare()
        results = convert_all()
        publisher.finish()
    return results
