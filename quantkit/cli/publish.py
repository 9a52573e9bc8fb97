"""`quantkit publish`: main + one branch per bitrate, on the Hub or in a local git repository."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli.output import Output
from quantkit.worklock import command_line, work_lock


@click.command()
@click.argument("work", type=click.Path(path_type=Path, file_okay=False))
@click.option("--repo", required=True, help="The Hub repo USER/NAME (created if missing; also named in the card).")
@click.option("--private", is_flag=True, help="Create the Hub repo private (checked against your private storage).")
@click.option("--to", "to", type=click.Path(path_type=Path, file_okay=False),
              help="Publish into this local git repository instead of the Hub (created if missing).")
@click.option("--force", is_flag=True, help="Overwrite or delete files on a branch that quantkit did not write.")
@click.option("--prompt-format", "prompt_fmt", help="The card's prompt format when the model's is unknown (see `quantkit card --help`).")
def publish(work: Path, repo: str, private: bool, to: Path | None, force: bool, prompt_fmt: str | None) -> None:
    """Publish a converted work folder: main gets measurement.json, README.md and the recipe; each
    WORK/out/<branch> goes to its own branch, cut from the repo's first commit, with the README too.

    Reruns are cheap: only what is missing or changed is committed, and every branch is checked
    afterwards. Without a Hugging Face token (and without --to) it publishes into the local git
    repository WORK/hub-repo, which you can inspect and push later.

    \b
    Examples:
      quantkit publish work/llama3 --repo alice/Llama-3-8B-exl2
      quantkit publish work/llama3 --repo alice/Llama-3-8B-exl2 --private
      quantkit publish work/llama3 --repo alice/Llama-3-8B-exl2 --to /tmp/llama3-exl2
      git -C /tmp/llama3-exl2 log --all --oneline
    """
    from quantkit.guards import check_publish_paths
    from quantkit.publish import PublishOptions, publish_work

    out = Output()
    check_publish_paths(work, to)
    options = PublishOptions(repo=repo, to=to, private=private, force=force, prompt_format=prompt_fmt)
    with work_lock(work, command_line("publish", work, "--repo", repo)):
        report = publish_work(work, options, say=out.info, warn=out.warn)
    out.info(f"{report.target}: {len(report.results)} branches verified, {report.commits} commit{'s' if report.commits != 1 else ''} made")
