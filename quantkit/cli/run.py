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
from quantkit.cli.publish import say_report
from quantkit.eval.core import for_pipeline, read_report
from quantkit.pipeline import Pipeline
from quantkit.publish import BackgroundPublisher, PublishOptions
from quantkit.run import RunRecipe, check_run_paths, load_run_recipe, publish_options, run_all
from quantkit.run import dry_run as plan_dry_run
from quantkit.source import check_hub_id
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
@click.option("--repo", help="Publish to this Hub repo USER/NAME (overrides the recipe's [publish] repo; needs a token).")
@click.option("--to", "to", type=click.Path(path_type=Path, file_okay=False),
              help="Publish into this local git repository instead of the Hub (overrides the recipe's [publish] to).")
@click.option("--private", is_flag=True, help="Create the Hub repo private (or private = true in [publish]).")
@click.option("--force", is_flag=True, help="Overwrite or delete files on a branch that quantkit did not write.")
@click.option("--base-model", help="The source's Hub id USER/NAME for the card, when the model is a folder that does not say.")
@click.option("--no-base-model", is_flag=True, help="Publish to the Hub without a base_model when the source's Hub id is unknown.")
@click.option("--keep-temp", is_flag=True, help="Keep the converter's scratch (out_tensor, calibration states) after each verified step.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: print the branches converted and what was committed where, as JSON on stdout.")
def run(recipes: tuple[Path, ...], work: Path | None, dry_run: bool, force_settings: bool, gpus: str | None,
        cluster: str | None, node_work: str | None, repo: str | None, to: Path | None, private: bool, force: bool,
        base_model: str | None, no_base_model: bool, keep_temp: bool, fmt: str) -> None:
    """Run RECIPE: calibration -> measure -> convert each branch -> evaluate it -> publish each.

    Publishing works as `quantkit publish` does, and each branch uploads while the next one converts:
    after the first branch is verified, main gets measurement.json, README and recipe; as each further
    branch lands, main's and every published branch's README are brought up to date, so the card lists
    exactly the branches that are there. Without a [publish] table (or --repo / --to) nothing is
    published. Publishing to the Hub needs a token (`hf auth login` or HF_TOKEN) and the source's Hub id.

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
    --force-settings. Once a step is finished and verified, the converter's scratch is deleted
    (--keep-temp keeps it).

    Each converted branch is evaluated against the unquantized model as `quantkit eval` does
    (perplexity, KL divergence, top-1 agreement; WORK/eval.json, the card's KL and PPL columns and the
    chart on main); a branch that fails to load or gives non-finite logits is not published.
    `eval = false` in the recipe turns this off.

    \b
    Recipe (TOML):
      model = "./Llama-3-8B"          # folder or Hub id
      base_model = "meta-llama/Meta-Llama-3-8B"  # the Hub id, when model is a folder that does not say
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
      quantkit run llama3.toml --to /tmp/llama3-exl2 --format json
      quantkit run llama3.toml --work /scratch/llama3 --force-settings
      quantkit run llama3.toml --gpus 0,1,2
      quantkit run llama3.toml mistral.toml qwen.toml --cluster ray://head:10001
    """
    out = Output()
    if work is not None and len(recipes) > 1:
        raise click.BadParameter("one work folder cannot hold several recipes: give one RECIPE, or a `work` in each", param_hint="--work")
    if (repo is not None or to is not None or base_model is not None) and len(recipes) > 1:
        raise click.BadParameter("--repo, --to and --base-model name one model's repo: give one RECIPE, or put them in each recipe",
                                 param_hint="--repo")
    if base_model is not None:
        check_hub_id(base_model)
    jobs: list[tuple[RunRecipe, Path, Path]] = []
    for path in recipes:  # every recipe is read before anything starts
        r = load_run_recipe(path)
        folder = work or r.work
        if folder is None:
            raise click.BadParameter(f"{path} names no `work` folder: add `work = \"DIR\"` to it, or pass --work", param_hint="--work")
        # The command's flags over the recipe's: base_model is recorded with the settings, the rest publishes.
        settings = r.settings if base_model is None else r.settings.model_copy(update={"base_model": base_model})
        options = publish_options(r.publish, repo=repo, to=to, private=private, force=force, base_model=base_model,
                                  no_base_model=no_base_model)
        r = r.model_copy(update={"settings": settings, "publish": options})
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
        _run_one(out, r, folder, path, force=force_settings, gpus=chosen, keep_temp=keep_temp, fmt=fmt)


def _run_one(out: Output, r: RunRecipe, folder: Path, recipe: Path, *, force: bool, gpus: list[str], keep_temp: bool, fmt: str) -> None:
    start = time.monotonic()
    # A bad repo id, a missing token or an unusable --to folder fails here, before any work.
    publisher = BackgroundPublisher(folder, r.publish, say=out.info, warn=out.warn) if r.publish is not None else None
    with work_lock(folder, command_line("run", recipe)), StepProgress(out) as view:
        p = Pipeline(r.settings, folder, listener=view, converter=measuring_converter(gpus), keep_temp=keep_temp)
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
    report = publisher.publisher.report() if publisher is not None else None
    evals = read_report(folder) if r.eval.enabled else None
    if fmt == "json":
        out.json({"work": str(p.work.root.resolve()),
                  "branches": [{"branch": res.branch, "achieved_decoder_bpw": res.provenance.achieved_decoder_bpw,
                                "folder": str(res.folder.resolve()), "evaluation": evals.branches[res.branch].model_dump(mode="json")
                                if evals is not None and res.branch in evals.branches else None}
                               for res in results],
                  "publish": report.model_dump(mode="json") if report is not None else None})
        return
    failed = evals.failed() if evals is not None else []
    where = f", published to {report.target}" if report is not None else ""
    for res in results:
        said = f", NOT published: its evaluation failed ({folder / 'eval.json'})" if res.branch in failed else where
        out.rich(f"{res.branch}: {res.provenance.achieved_decoder_bpw:.3f} bpw -> {res.folder}{said}")
    if report is None:
        out.warn("nothing published: add a [publish] table to the recipe (or pass --repo / --to), "
                 f"or run `quantkit publish {p.work.root} --repo USER/NAME`")
    else:
        say_report(out, report)
    own = total - p.converter_seconds
    out.info(f"quantkit's own time: {own:.2f} s of {total:.2f} s ({100 * own / total if total else 0:.1f} %)")


def dry_run_plan(p: Pipeline, publish: PublishOptions | None) -> Table:
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
    t.caption += escape(f"\npublish to {d.publish_target}" + "".join(f"\nwarning: {w}" for w in d.publish_warnings))
    if d.needs:
        t.caption += "\na real run needs:" + "".join(f"\n  {escape(n)}" for n in d.needs)  # [exl2] is not markup
    return t

