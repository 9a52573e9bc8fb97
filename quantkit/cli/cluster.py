"""`quantkit run RECIPE... --cluster ADDRESS`: the queue over a Ray cluster, shown in this terminal."""

from __future__ import annotations

import time
from pathlib import Path

from quantkit.cli.output import Output
from quantkit.cli.progress import StepProgress
from quantkit.cluster import QueueItem, connect, run_queue
from quantkit.run import RunRecipe


def run_on_cluster(out: Output, jobs: list[tuple[RunRecipe, Path]], *, address: str, force: bool, node_work: str | None) -> None:
    connect(address)  # Ray missing, or an address that does not answer: one line, nothing started
    items = [QueueItem(settings=r.settings, work=folder, publish=r.publish) for r, folder in jobs]
    start = time.monotonic()
    with StepProgress(out) as view:
        reports = run_queue(items, force=force, listener=view, say=out.info, node_root=node_work)
    total = time.monotonic() - start
    for rep in reports:
        for branch, info in rep.branches.items():
            bpw = info.get("achieved_decoder_bpw")
            out.rich(f"{rep.name} {branch}: {bpw:.3f} bpw, converted on {info.get('node')}, published to {rep.target}"
                     if isinstance(bpw, (int, float)) else f"{rep.name} {branch}: published to {rep.target}")
    out.info(f"cluster queue: {len(reports)} recipe(s) in {total:.2f} s")
