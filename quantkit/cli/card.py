"""`quantkit card`: write the README of an EXL2 repo. Parses options, calls the core, renders."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.card import card_spec, parse_card, render_card
from quantkit.cli.output import Output
from quantkit.files import write_output
from quantkit.guards import is_within, local_model_dir, recorded_model_dir, refuse_in_model
from quantkit.source import check_hub_id
from quantkit.workfolder import is_work_folder
from quantkit.worklock import command_line, work_lock


@click.command()
@click.argument("ref", metavar="WORK|MODEL")
@click.option("--repo", help="Where the quants are published (USER/NAME): download commands and quantized_by.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Write the card here instead of stdout.")
@click.option("--prompt-format", "prompt_fmt", help="A known format (chatml, llama3, zephyr, openchat, ...) or the format itself with {prompt}.")
@click.option("--cache", default="fp16", show_default=True, type=click.Choice(["fp16", "fp8", "q8", "q6", "q4"]), help="Cache mode of the VRAM columns.")
@click.option("--base-model", help="The source's Hub id, when the work folder names a local path.")
@click.option("--no-source-card", is_flag=True, help="Leave the source model's own card out.")
def card(ref: str, repo: str | None, output: Path | None, prompt_fmt: str | None, cache: str, base_model: str | None, no_source_card: bool) -> None:
    """Write the model card (README.md) for EXL2 quants of a model.

    WORK is a quantkit work folder: once converted, the table uses each branch's real size; before, the
    planner's figures. MODEL is a model folder (config.json + tokenizer files): the planned card.

    \b
    Examples:
      quantkit card work/llama3 --repo alice/Llama-3-8B-exl2 --output README.md
      quantkit card models/Llama-3-8B --repo alice/Llama-3-8B-exl2
      quantkit card work/rocket --prompt-format chatml --cache q4
    """
    out = Output()
    if base_model is not None:
        check_hub_id(base_model)
    work = Path(ref).expanduser() if is_work_folder(Path(ref).expanduser()) else None
    if output is not None:
        model_dir = recorded_model_dir(work) if work is not None else local_model_dir(ref)
        refuse_in_model(output, model_dir, what="--output")
    spec = card_spec(ref, repo=repo, override_format=prompt_fmt, cache=cache, base_model=base_model,
                     include_source_card=not no_source_card)
    for note in spec.notes:
        out.warn(note)
    text = render_card(spec)
    parse_card(text)  # the front matter must read back before anything is written
    if output is None:
        out.text(text.rstrip("\n"))
        return
    if work is not None and is_within(output, work):
        with work_lock(work, command_line("card", ref, "--output", output)):
            write_output(output, text)
    else:
        write_output(output, text)
    out.info(f"wrote {output}")
