"""`quantkit run RECIPE.toml`: the whole pipeline from one file, resumable; `--dry-run` shows the plan."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from quantkit.cli.measure import say_adapter
from quantkit.cli.output import Output
from quantkit.cli.progress import StepProgress
from quantkit.cli.publish import say_report
from quantkit.pipeline import Pipeline
from quantkit.publish import BackgroundPublisher, PublishOptions
from quantkit.run import check_run_paths, load_run_recipe, publish_options, run_all
from quantkit.run import dry_run as plan_dry_run
from quantkit.source import check_hub_id
from quantkit.units import format_gib
from quantkit.worklock import command_line, work_lock


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), help="The work folder (default: the recipe's `work`).")
@click.option("--dry-run", is_flag=True, help="Print the steps, their disk/RAM/VRAM and the reachable bitrates; run nothing.")
@click.option("--force-settings", is_flag=True, help="Allow settings that invalidate finished work; redoes those steps.")
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
def run(recipe: Path, work: Path | None, dry_run: bool, force_settings: bool, repo: str | None, to: Path | None,
        private: bool, force: bool, base_model: str | None, no_base_model: bool, keep_temp: bool, fmt: str) -> None:
    """Run RECIPE: calibration -> measure -> convert each branch -> publish each.

    Publishing works as `quantkit publish` does, and each branch uploads while the next one converts:
    after the first branch is verified, main gets measurement.json, README and recipe; as each further
    branch lands, main's and every published branch's README are brought up to date, so the card lists
    exactly the branches that are there. Without a [publish] table (or --repo / --to) nothing is
    published. Publishing to the Hub needs a token (`hf auth login` or HF_TOKEN) and the source's Hub id.

    State lives in WORK/state.json (atomic writes; "published" says what landed where). After a crash
    anywhere, including mid-conversion or mid-upload, the same command resumes where it stopped and
    publishes only what is missing. Settings that would invalidate finished work are locked unless
    --force-settings. Once a step is finished and verified, the converter's scratch is deleted
    (--keep-temp keeps it).

    \b
    Recipe (TOML):
      model = "./Llama-3-8B"          # folder or Hub id
      base_model = "meta-llama/Meta-Llama-3-8B"  # the Hub id, when model is a folder that does not say
      work = "work/llama3"
      calibration = "default"         # recipe name or file; calibration_source = "..." for toxic-qna
      rows = 100                      # quant pass; measurement_rows = 16; length = 2048
      branches = "default"            # or a branch-set file, or [[branches]] tables
      [publish]
      repo = "alice/Llama-3-8B-exl2"  # private = true; or to = "exl2-repo" (a local git repo)
    \b
    Examples:
      quantkit run llama3.toml --dry-run
      quantkit run llama3.toml
      quantkit run llama3.toml --to /tmp/llama3-exl2 --format json
      quantkit run llama3.toml --work /scratch/llama3 --force-settings
    """
    out = Output()
    r = load_run_recipe(recipe)
    folder = work or r.work
    if folder is None:
        raise click.BadParameter("the recipe names no `work` folder: pass --work DIR", param_hint="--work")
    settings = r.settings if base_model is None else r.settings.model_copy(update={"base_model": check_hub_id(base_model)})
    options = publish_options(r.publish, repo=repo, to=to, private=private, force=force, base_model=base_model,
                              no_base_model=no_base_model)
    check_run_paths(r.model_copy(update={"publish": options}), folder)
    if dry_run:
        p = Pipeline(settings, folder)
        say_adapter(out, p)
        out.rich(dry_run_plan(p, options))
        return
    start = time.monotonic()
    # A bad repo id, a missing token or an unusable --to folder fails here, before any work.
    publisher = BackgroundPublisher(folder, options, say=out.info, warn=out.warn) if options is not None else None
    with work_lock(folder, command_line("run", recipe)), StepProgress(out) as view:
        p = Pipeline(settings, folder, listener=view, keep_temp=keep_temp)
        say_adapter(out, p)
        p.lock(force=force_settings)
        results = run_all(p, publisher)
    total = time.monotonic() - start
    report = publisher.publisher.report() if publisher is not None else None
    if fmt == "json":
        out.json({"work": str(p.work.root.resolve()),
                  "branches": [{"branch": res.branch, "achieved_decoder_bpw": res.provenance.achieved_decoder_bpw,
                                "folder": str(res.folder.resolve())} for res in results],
                  "publish": report.model_dump(mode="json") if report is not None else None})
        return
    where = f", published to {report.target}" if report is not None else ""
    for res in results:
        out.rich(f"{res.branch}: {res.provenance.achieved_decoder_bpw:.3f} bpw -> {res.folder}{where}")
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
    return t

