"""`quantkit measure` and `quantkit convert`: the two halves of the EXL2 pipeline, one work folder."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from quantkit.branches import Branch, branches_for
from quantkit.cli.gpus import gpus_from, gpus_option, slots
from quantkit.cli.output import Output
from quantkit.cli.progress import StepProgress
from quantkit.errors import InvalidCount
from quantkit.guards import check_work_folder, local_model_dir
from quantkit.parallel import convert_parallel
from quantkit.pipeline import Pipeline, Settings
from quantkit.workfolder import read_settings
from quantkit.units import parse_bits, split_list
from quantkit.vram import check_head_bits
from quantkit.worklock import command_line, work_lock

work_option = click.option("--work", "work", required=True, type=click.Path(path_type=Path, file_okay=False),
                           help="The work folder (calibration, measurement, one job per bitrate, cleaned outputs).")
force_option = click.option("--force-settings", is_flag=True, help="Allow settings that invalidate finished work; redoes those steps.")
keep_temp_option = click.option("--keep-temp", is_flag=True,
                                help="Keep the converter's scratch (out_tensor, calibration states) once a step is finished and verified.")


def _count(name: str, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise InvalidCount(name, value)
    return value


def _settings(model: str, work: Path, **given: object) -> Settings:
    """Settings from the flags, falling back to what WORK/recipe.json recorded, then to defaults."""
    check_work_folder(work, local_model_dir(model))  # before WORK is read or written
    record = read_settings(work)
    values = record.settings.model_dump() if record is not None else {}
    values |= {"model": model, "branches": []} | {k: v for k, v in given.items() if v is not None}
    return Settings.model_validate(values)


def say_adapter(out: Output, p: Pipeline) -> None:
    """The one line that says an architecture adapter is in play, and whether it is proven."""
    if p.adapter is not None:
        out.warn(f"architecture adapter: {p.adapter.summary()}; the converter reads its working copy in {p.work.adapted}")


@click.command()
@click.argument("model")
@work_option
@click.option("--calibration", help="A calibration recipe name (see `quantkit calibration show`) or a data file. Default: default.")
@click.option("--source", "calibration_source", help="The data for a recipe that brings none (e.g. toxic-qna).")
@click.option("--rows", type=int, help="Calibration rows for the measurement pass (exllamav2 -mr; default 16).")
@click.option("--length", type=int, help="Tokens per row (exllamav2 -ml/-l; default 2048).")
@force_option
@keep_temp_option
def measure(model: str, work: Path, calibration: str | None, calibration_source: str | None, rows: int | None,
            length: int | None, force_settings: bool, keep_temp: bool) -> None:
    """Measure MODEL once with exllamav2 (`-om`): the measurement every bitrate is converted from.

    Builds the calibration set into WORK/calibration, runs the measurement pass with progress per
    stage, and writes WORK/measurement.json with a provenance record (model fingerprint, calibration
    hash, rows, length, exllamav2 version). A rerun after a crash resumes where it stopped.

    \b
    Examples:
      quantkit measure ./Llama-3-8B --work work/llama3
      quantkit measure ./Llama-3-8B --work work/llama3 --calibration toxic-qna --source chats.jsonl
      quantkit measure ./Llama-3-8B --work work/llama3 --rows 32 --length 2048
    """
    out = Output()
    s = _settings(model, work, calibration=calibration, calibration_source=calibration_source,
                  measurement_rows=_count("rows", rows), length=_count("length", length))
    with work_lock(work, command_line("measure", model, "--work", work)), StepProgress(out) as view:
        p = Pipeline(s, work, listener=view, keep_temp=keep_temp)
        say_adapter(out, p)
        p.lock(force=force_settings)
        prov = p.measure()
        _m, rng, _ = p.analysis()
    out.rich(f"measurement: {p.work.measurement}  (sha256 {prov.measurement_sha256[:12]}, {prov.rows} rows x {prov.length} tokens)")
    out.rich(f"reachable decoder bitrates on this model: {rng.low:.3f} to {rng.high:.3f} bpw")


@click.command()
@click.argument("model")
@work_option
@click.option("--bits", default="8.0,6.5,5.0", show_default=True, help="Comma-separated target bitrates, one branch each.")
@click.option("--head-bits", type=int, default=8, show_default=True, help="lm_head bits: 2, 3, 4, 5, 6 or 8.")
@click.option("--rows", type=int, help="Calibration rows for the quantization pass (exllamav2 -r; default 100).")
@gpus_option
@force_option
@keep_temp_option
def convert(model: str, work: Path, bits: str, head_bits: int, rows: int | None, gpus: str | None, force_settings: bool,
            keep_temp: bool) -> None:
    """Convert MODEL to each bitrate from the one measurement in WORK (exllamav2 `-m`).

    Each bitrate gets WORK/jobs/<branch> (so a crash resumes mid-conversion; its scratch goes once
    the branch is verified, unless --keep-temp) and a cleaned, publishable WORK/out/<branch>: no
    stale index or source README, a correct index, exllamav2's
    quantization_config and quantkit.json provenance. Before any GPU work it refuses a measurement
    from another model and bitrates the measurement cannot reach.

    With several GPUs (--gpus, or all visible by default) each bitrate converts in its own converter
    process pinned to one GPU, as many at once as there are GPUs and as the system RAM allows.

    \b
    Examples:
      quantkit convert ./Llama-3-8B --work work/llama3
      quantkit convert ./Llama-3-8B --work work/llama3 --bits 4.0,3.5 --head-bits 6
      quantkit convert ./Llama-3-8B --work work/llama3 --bits 8.0,6.5,5.0 --gpus 0,1,2
    """
    out = Output()
    check_head_bits(head_bits)
    brs: list[Branch] = branches_for([parse_bits(x) for x in split_list(bits)], head_bits)
    if not brs:
        raise click.BadParameter("give at least one bitrate", param_hint="--bits")
    chosen = gpus_from(gpus)  # a GPU that does not exist is refused before anything starts
    s = _settings(model, work, rows=_count("rows", rows)).model_copy(update={"branches": brs})
    with work_lock(work, command_line("convert", model, "--work", work)), StepProgress(out) as view:
        p = Pipeline(s, work, listener=view, keep_temp=keep_temp)
        say_adapter(out, p)
        p.lock(force=force_settings)
        rng = p.check_branches(brs)  # all of them, before the first conversion starts
        plan = slots(out, p, brs, chosen)
        results = convert_parallel(p, brs, plan) if plan else [p.convert(b) for b in brs]
    t = Table(title=f"EXL2 branches in {p.work.root / 'out'} (reachable {rng.low:.3f}-{rng.high:.3f} bpw)")
    for col in ("Branch", "Target", "Achieved (decoder)", "Head", "Size", "Folder"):
        t.add_column(col)
    for r in results:
        pv = r.provenance
        t.add_row(r.branch, f"{pv.bits:g}", f"{pv.achieved_decoder_bpw:.3f}", f"{pv.achieved_head_bpw:.2f}",
                  f"{pv.bytes / 1024**2:.1f} MiB", str(r.folder))
    out.rich(t)
