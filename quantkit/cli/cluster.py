"""`quantkit run RECIPE... --cluster ADDRESS`: the queue over a Ray cluster, shown in this terminal."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from quantkit.cli.output import Output
from quantkit.cli.progress import StepProgress
from quantkit.cluster import QueueItem, connect, run_queue
from quantkit.run import RunRecipe
from quantkit.worklock import command_line, work_lock


def run_on_cluster(out: Output, jobs: list[tuple[RunRecipe, Path, Path]], *, address: str, force: bool,
                   node_work: str | None) -> None:
    connect(address)  # Ray missing, or an address that does not answer: one line, nothing started
    items = [QueueItem(settings=r.settings, work=folder, publish=r.publish) for r, folder, _ in jobs]
    start = time.monotonic()
    with ExitStack() as locks, StepProgress(out) as view:
        for _, folder, path in jobs:  # this driver owns every work folder of the queue while it runs
            locks.enter_context(work_lock(folder, command_line("run", path, "--cluster", address)))
        reports = run_queue(items, force=force, listener=view, say=out.info, node_root=node_work)
    total = time.monotonic() - start
    for rep in reports:
        for branch, info in rep.branches.items():
            bpw = info.get("achieved_decoder_bpw")
            where = f", published to {rep.target}" if info.get("published") else ", not published"
            out.rich(f"{rep.name} {branch}: {bpw:.3f} bpw, converted on {info.get('node')}{where}"
                     if isinstance(bpw, (int, float)) else f"{rep.name} {branch}{where}")
    out.info(f"cluster queue: {len(reports)} recipe(s) in {total:.2f} s")
