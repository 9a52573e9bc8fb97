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
from quantkit.pipeline import Pipeline
from quantkit.run import dry_run as plan_dry_run
from quantkit.publish import BackgroundPublisher, PublishOptions
from quantkit.run import check_run_paths, load_run_recipe, run_all
from quantkit.units import format_gib
from quantkit.worklock import command_line, work_lock


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), help="The work folder (default: the recipe's `work`).")
@click.option("--dry-run", is_flag=True, help="Print the steps, their disk/RAM/VRAM and the reachable bitrates; run nothing.")
@click.option("--force-settings", is_flag=True, help="Allow settings that invalidate finished work; redoes those steps.")
def run(recipe: Path, work: Path | None, dry_run: bool, force_settings: bool) -> None:
    """Run RECIPE: calibration -> measure -> convert each branch -> publish each.

    Publishing works as `quantkit publish` does (main gets measurement.json, README and recipe; each
    bitrate its own branch), and each branch uploads while the next one converts. Without a [publish]
    table, or without a Hugging Face token, it publishes into the local git repository WORK/hub-repo.

    State lives in WORK/state.json (atomic writes; "published" says what landed where). After a crash
    anywhere, including mid-conversion or mid-upload, the same command resumes where it stopped and
    publishes only what is missing. Settings that would invalidate finished work are locked unless
    --force-settings.

    \b
    Recipe (TOML):
      model = "./Llama-3-8B"          # folder or Hub id
      work = "work/llama3"
      calibration = "default"         # recipe name or file; calibration_source = "..." for toxic-qna
      rows = 100                      # quant pass; measurement_rows = 16; length = 2048
      branches = "default"            # or a branch-set file, or [[branch]] tables
      [publish]
      repo = "alice/Llama-3-8B-exl2"  # private = true; or to = "exl2-repo" (a local git repo)
    \b
    Examples:
      quantkit run llama3.toml --dry-run
      quantkit run llama3.toml
      quantkit run llama3.toml --work /scratch/llama3 --force-settings
    """
    out = Output()
    r = load_run_recipe(recipe)
    folder = work or r.work
    if folder is None:
        raise click.BadParameter("the recipe names no `work` folder: pass --work DIR", param_hint="--work")
    check_run_paths(r, folder)
    if dry_run:
        p = Pipeline(r.settings, folder)
        say_adapter(out, p)
        out.rich(dry_run_plan(p, r.publish))
        return
    start = time.monotonic()
    publisher = BackgroundPublisher(folder, r.publish, say=out.info)  # a bad repo id fails before any work
    with work_lock(folder, command_line("run", recipe)), StepProgress(out) as view:
        p = Pipeline(r.settings, folder, listener=view)
        say_adapter(out, p)
        p.lock(force=force_settings)
        results = run_all(p, publisher)
    total = time.monotonic() - start
    for res in results:
        out.rich(f"{res.branch}: {res.provenance.achieved_decoder_bpw:.3f} bpw -> {res.folder}, published to {publisher.target.id}")
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

