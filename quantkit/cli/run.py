"""`quantkit run RECIPE.toml`: the whole pipeline from one file, resumable; `--dry-run` shows the plan."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from quantkit.cli.gpus import gpus_from, gpus_option, measuring_converter, slots
from quantkit.cli.measure import say_adapter
from quantkit.cli.output import Output
from quantkit.cli.progress import StepProgress
from quantkit.eval.core import failed_branches, for_pipeline
from quantkit.pipeline import Pipeline
from quantkit.run import dry_run as plan_dry_run
from quantkit.publish import BackgroundPublisher, PublishOptions
from quantkit.run import RunRecipe, check_run_paths, load_run_recipe, run_all
from quantkit.units import format_gib
from quantkit.worklock import command_line, work_lock


@click.command()
@click.argument("recipes", nargs=-1, required=True, metavar="RECIPE...", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), help="The work folder (default: the recipe's `work`); one RECIPE only.")
@click.option("--dry-run", is_flag=True, help="Print the steps, their disk/RAM/VRAM and the reachable bitrates; run nothing.")
@click.option("--force-settings", is_flag=True, help="Allow settings that invalidate finished work; redoes those steps.")
@gpus_option
@click.option("--cluster", metavar="ADDRESS",
              help="Run on a Ray cluster (pip install 'quantkit-exl2[ray]'): ray://HOST:PORT, HOST:PORT or `auto`. "
                   "Each measurement and each branch conversion is a task needing one GPU; several RECIPEs form one queue.")
@click.option("--node-work", metavar="DIR",
              help="With --cluster: the folder on each node for its tasks' converter work (default: $QUANTKIT_NODE_WORK, "
                   "else quantkit-cluster in the node's temporary folder).")
def run(recipes: tuple[Path, ...], work: Path | None, dry_run: bool, force_settings: bool, gpus: str | None,
        cluster: str | None, node_work: str | None) -> None:
    """Run RECIPE: calibration -> measure -> convert each branch -> evaluate it -> publish each.

    Publishing works as `quantkit publish` does (main gets measurement.json, README and recipe; each
    bitrate its own branch), and each branch uploads while the next one converts. Without a [publish]
    table, or without a Hugging Face token, it publishes into the local git repository WORK/hub-repo.

    With several GPUs (--gpus, or all visible by default) the branches convert side by side, one
    converter process pinned to each GPU, as many at once as the system RAM allows, and each is
    published as soon as it is converted. Several RECIPEs run one after another.

    With --cluster, the measurement and each branch's conversion are Ray tasks that need one GPU,
    and several RECIPEs form one queue over the cluster: each node fetches the model it needs (from
    the Hub, or a path on shared storage), gets measurement.json through Ray's object store and
    publishes the branch it converted. This machine keeps each work folder's state, so a rerun after
    a node or driver failure redoes only what is missing.

    State lives in WORK/state.json (atomic writes; "published" says what landed where). After a crash
    anywhere, including mid-conversion or mid-upload, the same command resumes where it stopped and
    publishes only what is missing. Settings that would invalidate finished work are locked unless
    --force-settings.

    Each converted branch is evaluated against the unquantized model as `quantkit eval` does
    (perplexity, KL divergence, top-1 agreement; WORK/eval.json, the card's KL and PPL columns and the
    chart on main); a branch that fails to load or gives non-finite logits is not published.
    `eval = false` in the recipe turns this off.

    \b
    Recipe (TOML):
      model = "./Llama-3-8B"          # folder or Hub id
      work = "work/llama3"
      calibration = "default"         # recipe name or file; calibration_source = "..." for toxic-qna
      rows = 100                      # quant pass; measurement_rows = 16; length = 2048
      branches = "default"            # or a branch-set file, or [[branch]] tables
      eval = false                    # or [eval] with rows = 20, length = 2048, source = "...", top_k = 100
      [publish]
      repo = "alice/Llama-3-8B-exl2"  # private = true; or to = "exl2-repo" (a local git repo)
    \b
    Examples:
      quantkit run llama3.toml --dry-run
      quantkit run llama3.toml
      quantkit run llama3.toml --work /scratch/llama3 --force-settings
      quantkit run llama3.toml --gpus 0,1,2
      quantkit run llama3.toml mistral.toml qwen.toml --cluster ray://head:10001
    """
    out = Output()
    if work is not None and len(recipes) > 1:
        raise click.BadParameter("one work folder cannot hold several recipes: give one RECIPE, or a `work` in each", param_hint="--work")
    jobs: list[tuple[RunRecipe, Path, Path]] = []
    for path in recipes:  # every recipe is read before anything starts
        r = load_run_recipe(path)
        folder = work or r.work
        if folder is None:
            raise click.BadParameter(f"{path} names no `work` folder: add `work = \"DIR\"` to it, or pass --work", param_hint="--work")
        check_run_paths(r, folder)
        jobs.append((r, folder, path))
    if dry_run:
        for r, folder, _ in jobs:
            p = Pipeline(r.settings, folder)
            say_adapter(out, p)
            out.rich(dry_run_plan(p, r.publish))
        return
    if cluster is not None:
        if gpus is not None:
            raise click.BadParameter("on a cluster Ray gives each task one GPU: drop --gpus", param_hint="--gpus")
        from quantkit.cli.cluster import run_on_cluster

        run_on_cluster(out, jobs, address=cluster, force=force_settings, node_work=node_work)
        return
    if node_work is not None:
        raise click.BadParameter("--node-work goes with --cluster", param_hint="--node-work")
    chosen = gpus_from(gpus)  # a GPU that does not exist is refused before anything starts
    for r, folder, path in jobs:
        _run_one(out, r, folder, path, force=force_settings, gpus=chosen)


def _run_one(out: Output, r: RunRecipe, folder: Path, recipe: Path, *, force: bool, gpus: list[str]) -> None:
    start = time.monotonic()
    publisher = BackgroundPublisher(folder, r.publish, say=out.info)  # a bad repo id fails before any work
    with work_lock(folder, command_line("run", recipe)), StepProgress(out) as view:
        p = Pipeline(r.settings, folder, listener=view, converter=measuring_converter(gpus))
        say_adapter(out, p)
        p.lock(force=force)
        plan = slots(out, p, r.settings.branches, gpus)
        evaluation = for_pipeline(p, r.eval, say=lambda m: view.progress.console.print(m, markup=False, highlight=False)) if r.eval.enabled else None
        try:
            results = run_all(p, publisher, evaluation, slots=plan)
        finally:
            if evaluation is not None:
                evaluation.close()
    total = time.monotonic() - start
    failed = failed_branches(folder) if evaluation is not None else []
    for res in results:
        where = f"NOT published: its evaluation failed ({folder / 'eval.json'})" if res.branch in failed else f"published to {publisher.target.id}"
        out.rich(f"{res.branch}: {res.provenance.achieved_decoder_bpw:.3f} bpw -> {res.folder}, {where}")
    own = total - p.converter_seconds
    out.info(f"quantkit's own time: {own:.2f} s of {total:.2f} s ({100 * own / total if total else 0:.1f} %)")


def dry_run_plan(p: Pipeline, publish: PublishOptions) -> Table:
    d = plan_dry_run(p, publish)
    t = Table(title=f"Plan for {p.model.name} in {p.work.root}")
    for col in ("Step", "State", "Disk", "System RAM", "VRAM (convert)", "VRAM (load, 4k fp16)"):
        t.add_column(col)
    for s in d.steps:
        n = s.needs
        t.add_row(s.step, s.status, format_gib(n.disk_bytes) if n else "-", format_gib(n.ram_bytes) if n else "-",
                  format_gib(n.vram_bytes) if n else "-", format_gib(s.inference_vram_bytes) if s.inference_vram_bytes else "-")
    if d.reachable:
        t.caption = f"{d.note}: {d.reachable[0]:.3f} to {d.reachable[1]:.3f} bpw" + (f"; UNREACHABLE: {', '.join(d.unreachable)}" if d.unreachable else "")
    else:
        t.caption = d.note
    notes = [f"{s.step}: {s.note}" for s in d.steps if s.note]
    if notes:
        t.caption = "\n".join([t.caption, *notes])
    t.caption += f"\npublish to {d.publish_target}" + "".join(f"\nwarning: {w}" for w in d.publish_warnings)
    if d.needs:
        t.caption += "\na real run needs:" + "".join(f"\n  {escape(n)}" for n in d.needs)  # [exl2] is not markup
    return t

