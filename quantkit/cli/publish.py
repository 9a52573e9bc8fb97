"""`quantkit publish`: main + one branch per bitrate, on the Hub or in a local git repository."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli.output import Output
from quantkit.guards import check_publish_paths
from quantkit.publish import PublishOptions, PublishReport, publish_work
from quantkit.worklock import command_line, work_lock


@click.command()
@click.argument("work", type=click.Path(path_type=Path, file_okay=False))
@click.option("--repo", required=True, help="The Hub repo USER/NAME (created if missing; also named in the card).")
@click.option("--private", is_flag=True, help="Create the Hub repo private (checked against your private storage).")
@click.option("--to", "to", type=click.Path(path_type=Path, file_okay=False),
              help="Publish into this local git repository instead of the Hub (created if missing; an empty or git folder).")
@click.option("--force", is_flag=True, help="Overwrite or delete files on a branch that quantkit did not write.")
@click.option("--prompt-format", "prompt_fmt", help="The card's prompt format when the model's is unknown (see `quantkit card --help`).")
@click.option("--base-model", help="The source's Hub id USER/NAME for the card, when the work folder does not know it.")
@click.option("--no-base-model", is_flag=True, help="Publish to the Hub without a base_model when the source's Hub id is unknown.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: print what was committed where, as JSON on stdout.")
def publish(work: Path, repo: str, private: bool, to: Path | None, force: bool, prompt_fmt: str | None,
            base_model: str | None, no_base_model: bool, fmt: str) -> None:
    """Publish a converted work folder: each WORK/out/<branch> goes to its own branch, cut from the
    repo's first commit; main gets measurement.json, README.md and the recipe after the first branch.

    The README on main and on every branch lists exactly the branches already published, with their
    real sizes, and carries the source's metadata (base_model, license, language, datasets, tags).
    Reruns are cheap: only what is missing or changed is committed, and every branch is checked
    afterwards. The Hub needs a token (`hf auth login` or HF_TOKEN); --to publishes into a local git
    repository instead (with git-lfs when it is installed), and says how to push it.

    \b
    Examples:
      quantkit publish work/llama3 --repo alice/Llama-3-8B-exl2
      quantkit publish work/llama3 --repo alice/Llama-3-8B-exl2 --private --base-model meta-llama/Meta-Llama-3-8B
      quantkit publish work/llama3 --repo alice/Llama-3-8B-exl2 --to /tmp/llama3-exl2 --format json
      git -C /tmp/llama3-exl2 log --all --oneline
    """
    out = Output()
    check_publish_paths(work, to)
    options = PublishOptions(repo=repo, to=to, private=private, force=force, prompt_format=prompt_fmt,
                             base_model=base_model, no_base_model=no_base_model)
    with work_lock(work, command_line("publish", work, "--repo", repo)):
        report = publish_work(work, options, say=out.info, warn=out.warn)
    if fmt == "json":
        out.json(report.model_dump(mode="json"))
        return
    say_report(out, report)


def say_report(out: Output, report: PublishReport) -> None:
    """The closing lines: what is where, and how to push a local repository."""
    made = report.commit_count
    out.info(f"{report.target}: {', '.join(report.branches) or 'nothing'} verified, {made} commit{'s' if made != 1 else ''} made")
    if report.push:
        why = "" if report.lfs else " (git-lfs is not installed: its files are plain git blobs, which the Hub refuses)"
        out.info(f"to push {report.path} to the Hub{why}:")
        for line in report.push:
            out.info(f"  {line}")
