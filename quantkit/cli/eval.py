"""`quantkit eval WORK`: perplexity, KL divergence and top-1 agreement of every branch against the
unquantized model, cached and resumable, into WORK/eval.json and the card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantkit.cli.output import Output
from quantkit.eval.core import EvalSpec, check_branch, for_pipeline, open_work, recorded_spec
from quantkit.eval.records import EvalReport
from quantkit.workfolder import converted_branches


class RowProgress:
    """One bar per evaluated model, advanced as the worker finishes rows."""

    def __init__(self, out: Output) -> None:
        self.progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                                 TimeElapsedColumn(), console=out.err, disable=out.quiet)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RowProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, task: str, row: int, rows: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(f"  eval · {task}", total=rows)
        self.progress.update(self.tasks[task], completed=row)

    def say(self, line: str) -> None:
        self.progress.console.print(line, markup=False, highlight=False)


@click.command(name="eval")
@click.argument("work", type=click.Path(path_type=Path, file_okay=False))
@click.option("--branch", "branches", multiple=True, help="Evaluate only this branch (repeatable). Default: every converted branch.")
@click.option("--source", help="The evaluation text: a file, dataset folder or Hub dataset id, as for calibration. Default: the bundled held-out sample.")
@click.option("--rows", type=int, help="Rows of evaluation text (default 20, or what the run recorded).")
@click.option("--length", type=int, help="Tokens per row (default 2048, or what the run recorded).")
@click.option("--top-k", type=int, help="Reference log-probabilities kept per token (default 100).")
@click.option("--reference", type=click.Choice(["auto", "full", "layers", "transformers"]),
              help="How to compute the reference: auto (from free VRAM), full load, module by module, or transformers on the CPU.")
@click.option("--allow-overlap", is_flag=True, help="Go on (with a warning) when the evaluation text overlaps the calibration set.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def eval_cmd(work: Path, branches: tuple[str, ...], source: str | None, rows: int | None, length: int | None, top_k: int | None,
             reference: str | None, allow_overlap: bool, fmt: str) -> None:
    """Measure each branch in WORK against the unquantized model: perplexity, mean / median / p99 KL
    divergence and top-1 agreement, with exllamav2's own loader.

    The reference logits are computed once and cached in WORK/eval (top-k log-probabilities plus the
    rest's mass); each branch's result is cached too, so a rerun only does what is missing. The figures
    go to WORK/eval.json, the chart to WORK/eval.svg, and the card's "Available sizes" table gains KL and
    PPL columns. A branch that fails to load or gives non-finite logits is marked failed: `quantkit
    publish` and `quantkit run` never publish it. Before loading, the memory plan says whether each model
    fits the free VRAM, and how the reference is computed when it does not.

    \b
    Examples:
      quantkit eval work/llama3
      quantkit eval work/llama3 --branch 4_0 --format json
      quantkit eval work/llama3 --source heldout.jsonl --rows 40 --length 1024
    """
    out = Output(quiet=fmt == "json")
    given = {"source": source, "rows": rows, "length": length, "top_k": top_k, "reference": reference}
    recorded = recorded_spec(work)
    spec = EvalSpec(**((recorded.model_dump() if recorded else {}) | {k: v for k, v in given.items() if v is not None}
                       | {"allow_overlap": allow_overlap, "enabled": True}))
    p = open_work(work)
    names = list(branches) or converted_branches(work)
    folders = {n: work / "out" / n for n in names}
    for folder in folders.values():
        check_branch(folder)
    with RowProgress(out) as view:
        with for_pipeline(p, spec, say=view.say if fmt != "json" else out.info, on_row=view) as evaluation:
            results = evaluation.branches(folders)
            report = evaluation.report(results)
    if fmt == "json":
        out.json(report.model_dump(mode="json"))
        return
    out.rich(table(report, names))
    out.info(f"written: {work / 'eval.json'}" + (f", {work / 'eval.svg'}" if (work / "eval.svg").is_file() else ""))


def table(report: EvalReport, names: list[str]) -> Table:
    t = Table(title=f"{report.text.tokens:,} tokens of {report.text.name}; unquantized PPL "
                    f"{report.reference.perplexity or 0:.4g} ({report.reference.mode})")
    for col in ("Branch", "bpw", "PPL", "KL mean", "KL median", "KL p99", "Top-1", "State"):
        t.add_column(col)
    for name in names:
        b = report.branches.get(name)
        if b is None:
            continue
        if b.status == "failed":
            t.add_row(name, f"{b.achieved_bpw or b.bits or 0:.3f}", "-", "-", "-", "-", "-", f"failed: {b.error}")
            continue
        t.add_row(name, f"{b.achieved_bpw or b.bits or 0:.3f}", f"{b.perplexity:.4g}", f"{b.kl_mean:.4f}", f"{b.kl_median:.4f}",
                  f"{b.kl_p99:.4f}", f"{100 * (b.top1_agreement or 0):.1f} %", "done")
    return t
