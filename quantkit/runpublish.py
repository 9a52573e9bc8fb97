"""Publishing inside `quantkit run`: bitrate N uploads in one background worker while N+1 converts.

The publishing itself is `quantkit.publish` (the same engine as `quantkit publish`): the target is
prepared once, the card written, `main` gets measurement.json + README + recipe/provenance, then each
converted branch is handed to a single worker thread. What landed is recorded by the publisher in
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

from pydantic import BaseModel, ConfigDict

from quantkit import publish as pub
from quantkit.errors import PublishFailed
from quantkit.targets import HubTarget, Target

#: Called with (event, branch) from the thread doing it: "upload-start", "upload-done", "upload-failed".
PublishEvent = Callable[[str, str], None]


class PublishSpec(BaseModel):
    """The recipe's `[publish]` table. With neither `repo` nor `to`, or a repo but no Hugging Face
    token, the run publishes into the local git repository WORK/hub-repo (and says so)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str | None = None  # the Hub repo USER/NAME
    private: bool = False
    to: Path | None = None  # a local git repository instead of the Hub
    prompt_format: str | None = None  # the card's prompt format when the model's is unknown


class BackgroundPublisher:
    """One run's publishing: `begin()` after the measurement, `submit(branch)` after each conversion,
    `check()` between conversions, `finish()` at the end. Use it as a context manager so the worker
    is joined whatever happens."""

    def __init__(self, work: Path, spec: PublishSpec, *, target: Target | None = None,
                 say: Callable[[str], None] | None = None, on_event: PublishEvent | None = None) -> None:
        self.work = work
        self.spec = spec
        self.say = say or (lambda _m: None)
        self.on_event = on_event or (lambda _e, _b: None)
        if target is None:
            choice = pub.choose_target(work, repo=spec.repo, to=spec.to, private=spec.private)
            target, self.warnings = choice.target, choice.warnings
        else:
            self.warnings = []
        self.target = target
        self.card: Path | None = None
        self.hashes = pub.FileHashes()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[tuple[str, Future[pub.BranchResult]]] = []

    def begin(self) -> pub.BranchResult:
        """Card, target and `main`. The card is rendered again on every run, never read back from disk:
        a file left by a crash could be half written (write_card rewrites it only when it differs, so an
        unchanged card makes no new README commit)."""
        for w in self.warnings:
            self.say(f"warning: {w}")
        card = pub.write_card(self.work, self.spec.repo, prompt_format=self.spec.prompt_format)
        self.card = card
        if isinstance(self.target, HubTarget):
            from quantkit.card import _hub_id
            from quantkit.workfolder import source_model

            # Before any conversion: a token that cannot write fails the run now, not hours later.
            for line in self.target.preflight(upload_bytes=pub.upload_bytes(self.work, card),
                                              source=_hub_id(source_model(self.work)), card_text=card.read_text(encoding="utf-8")):
                self.say(line)
        self.target.prepare()
        result = pub.publish_main(self.work, self.target, card, hashes=self.hashes)
        self.say(pub.said(result, self.target))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-publish")
        return result

    def submit(self, branch: str) -> None:
        """Queue `branch` for upload; returns at once."""
        assert self._pool is not None, "begin() first"
        self._futures.append((branch, self._pool.submit(self._upload, branch)))

    def _upload(self, branch: str) -> pub.BranchResult:
        assert self.card is not None
        self.on_event("upload-start", branch)
        try:
            result = pub.publish_branch(self.work, branch, self.target, card=self.card, hashes=self.hashes)
        except BaseException:
            self.on_event("upload-failed", branch)
            raise
        self.on_event("upload-done", branch)
        self.say(pub.said(result, self.target))
        return result

    def check(self) -> None:
        """Raise the first upload that has failed so far (as PublishFailed)."""
        for branch, future in self._futures:
            if future.done() and future.exception() is not None:
                exc = future.exception()
                raise PublishFailed(branch, self.target.id, exc) from exc

    def finish(self) -> list[pub.BranchResult]:
        """Wait for every upload; raise the first failure."""
        wait([f for _, f in self._futures])
        self.check()
        self.close()
        return [f.result() for _, f in self._futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundPublisher:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
