"""Rich progress for converter steps: one bar per (step, stage) from the `[STATUS]` lines; ` ## `
errors and ` !! ` warnings shown as they come. Everything goes to stderr through the output sink."""

from __future__ import annotations

from types import TracebackType

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from quantkit.cli.output import Output
from quantkit.exl2.status import LogLine


class StepProgress:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                 TimeElapsedColumn(), console=out.err, disable=out.quiet, transient=False)
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.current: dict[str, str] = {}

    def __enter__(self) -> StepProgress:
        self.progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()

    def __call__(self, step: str, line: LogLine | None) -> None:
        if line is None:
            self.progress.console.print(f"[bold]{step}[/bold]")
            return
        if line.status is not None:
            # "Embeddings" appears in both passes: a new bar once the previous stage moved on.
            key = (step, line.status.stage)
            if key not in self.tasks or self.current.get(step) != line.status.stage and self.progress.tasks[self.tasks[key]].finished:
                self.tasks[key] = self.progress.add_task(f"  {step} · {line.status.stage}", total=1.0)
            self.current[step] = line.status.stage
            self.progress.update(self.tasks[key], completed=line.status.completion)
        elif line.kind == "error":
            self.progress.console.print(f"[red]{line.text}[/red]", markup=True, highlight=False)
        elif line.kind == "warning":
            self.progress.console.print(f"[yellow]{line.text}[/yellow]", markup=True, highlight=False)
