"""Publishing inside `quantkit run`: bitrate N uploads in one background worker while N+1 converts.

The publishing itself is `publisher.Publisher`, the same as `quantkit publish`'s: the target is
prepared (and the Hub's pre-flight run) before any conversion; each converted branch is then handed to
a single worker thread, which lands it: the branch, then `main` (after the first branch) and the other
published branches' README, so the card always lists exactly what is there. What landed is recorded by the publisher in
WORK/state.json under "published" (a failure too, with its error), so a rerun after a crash finds the
converted branches done and the publisher, being idempotent, commits only what is missing.

Errors: an upload that fails while the next branch converts is raised (as `PublishFailed`) once that
conversion finishes, and no further conversion starts; the worker is always joined before the run ends.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType

from quantkit.errors import PublishFailed
from quantkit.publish.engine import SyncResult
from quantkit.publish.publisher import PublishOptions, Publisher
from quantkit.publish.target import Target

#: Called with (event, branch) from the thread doing it: "upload-start", "upload-done", "upload-failed".
PublishEvent = Callable[[str, str], None]


class BackgroundPublisher:
    """One run's publishing: `begin()` before the work, `submit(branch)` after each conversion,
    `check()` between conversions, `finish()` at the end. Use it as a context manager so the worker
    is joined whatever happens."""

    def __init__(self, work: Path, options: PublishOptions, *, target: Target | None = None,
                 say: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
                 on_event: PublishEvent | None = None) -> None:
        self.work = work
        self.options = options
        self.on_event = on_event or (lambda _e, _b: None)
        self.publisher = Publisher(work, options, target=target, say=say, warn=warn)  # a bad repo id fails here, before any work
        self.target = self.publisher.target
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[tuple[str, Future[list[SyncResult]]]] = []

    def begin(self) -> None:
        """Pre-flight and target, before any conversion: a token that cannot write, or a Hub publish
        without base_model, fails the run now, not hours later."""
        self.publisher.prepare()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-publish")

    def submit(self, branch: str) -> None:
        """Queue `branch` for upload; returns at once."""
        assert self._pool is not None, "begin() first"
        self._futures.append((branch, self._pool.submit(self._upload, branch)))

    def _upload(self, branch: str) -> list[SyncResult]:
        self.on_event("upload-start", branch)
        try:
            result = self.publisher.land(branch)
        except BaseException:
            self.on_event("upload-failed", branch)
            raise
        self.on_event("upload-done", branch)
        return result

    def check(self) -> None:
        """Raise the first upload that has failed so far (as PublishFailed)."""
        for branch, future in self._futures:
            if future.done() and future.exception() is not None:
                exc = future.exception()
                raise PublishFailed(branch, self.target.id, exc) from exc

    def finish(self) -> list[SyncResult]:
        """Wait for every upload; raise the first failure. Returns every sync, in order."""
        wait([f for _, f in self._futures])
        self.check()
        self.close()
        return [r for _, f in self._futures for r in f.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundPublisher:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
