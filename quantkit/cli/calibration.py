"""`quantkit calibration build|show`: calibration sets from recipes or files."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from quantkit import calibration as cal
from quantkit.cli.output import Output
from quantkit.guards import refuse_in_model


@click.group()
def calibration() -> None:
    """Calibration sets: the Parquet exllamav2 reads (one text column) plus a manifest.

    \b
    Examples:
      quantkit calibration show
      quantkit calibration show default
      quantkit calibration build default --model ./Llama-3-8B --out cal/
      quantkit calibration build chats.jsonl --model ./Llama-3-8B --messages-column messages --out cal/
    """


def _recipe(name: str, **overrides: object) -> tuple[cal.CalibrationRecipe, Path]:
    return cal.load_recipe(name, **overrides)


@calibration.command()
@click.argument("name")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="The model folder whose tokenizer.json counts the tokens (and whose chat template renders chats).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Where to write calibration.parquet and manifest.json.")
@click.option("--source", help="The data (file, dataset folder, or Hub dataset id) instead of the recipe's.")
@click.option("--format", "fmt", type=click.Choice(["auto", "parquet", "jsonl", "csv", "text", "dataset"]), help="The source format (default: from the suffix).")
@click.option("--split", help="Dataset split (default: train).")
@click.option("--text-column", help="The column holding text (default: text).")
@click.option("--messages-column", help="A column of chat turns, rendered through the model's chat template.")
@click.option("--seed", type=int, help="Sampling seed (default: the recipe's, 0).")
@click.option("--rows", type=int, help="Rows the set must fill (default 100).")
@click.option("--length", type=int, help="Tokens per row (default 2048).")
def build(name: str, model_dir: Path, out_dir: Path, source: str | None, fmt: str | None, split: str | None, text_column: str | None,
          messages_column: str | None, seed: int | None, rows: int | None, length: int | None) -> None:
    """Build a calibration set from NAME (a recipe in calibration/, a recipe .toml, or a data file).

    Refuses a source with fewer than rows x length tokens of the model's own tokenizer.

    \b
    Examples:
      quantkit calibration build default --model ./Llama-3-8B --out cal/
      quantkit calibration build toxic-qna --source chats.parquet --model ./Llama-3-8B --out cal/
      quantkit calibration build notes.txt --model ./Llama-3-8B --out cal/ --rows 16 --length 1024
    """
    out = Output()
    for k, v in (("rows", rows), ("length", length)):
        if v is not None:
            cal.check_count(k, v)
    refuse_in_model(out_dir, model_dir, what="--out")
    recipe, base = _recipe(name, source=source, format=fmt, split=split, text_column=text_column,
                           messages_column=messages_column, seed=seed, rows=rows, length=length)
    built = cal.build(recipe, base, model_dir, out_dir)
    m = built.manifest
    out.rich(f"{built.parquet}: {m.samples} samples, {m.tokens} tokens (needs {m.rows} x {m.length}), sha256 {m.sha256[:12]}")


@calibration.command()
@click.argument("name", required=False)
@click.option("--samples", type=int, default=3, show_default=True, help="How many samples to preview.")
def show(name: str | None, samples: int) -> None:
    """List the calibration recipes, or preview NAME's first samples (no model needed).

    \b
    Examples:
      quantkit calibration show
      quantkit calibration show default --samples 2
    """
    out = Output()
    if name is None:
        t = Table(title=f"Calibration recipes ({cal.recipe_dir()})")
        for col in ("Name", "Source", "Rows x length", "Description"):
            t.add_column(col)
        for n in cal.known_recipes():
            r, _ = cal.load_recipe(n)
            t.add_row(n, r.source or "(bring --source)", f"{r.rows} x {r.length}", r.description)
        out.rich(t)
        return
    recipe, base = _recipe(name)
    texts, total, fmt = cal.preview(recipe, base, n=samples)
    out.rich(f"{recipe.name}: {recipe.source} ({fmt}, {total} rows, seed {recipe.seed}, {recipe.rows} x {recipe.length} tokens wanted)")
    for i, text in enumerate(texts, 1):
        out.rich(f"--- sample {i}")
        out.text(text)
