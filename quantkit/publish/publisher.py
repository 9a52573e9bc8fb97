"""The publish stage's one entry point, shared by `quantkit publish` and `quantkit run`.

`Publisher` prepares a work folder's publishing (where to, the card, the Hub's pre-flight) and
publishes `main` and each converted branch through the engine. `publish_work` is the whole stage in one
call (`quantkit publish`); `quantkit run` drives the same `Publisher` branch by branch from a
background worker (`background.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.errors import WorkFolderIncomplete
from quantkit.files import write_text_atomic
from quantkit.publish import engine
from quantkit.publish.engine import CARD_NAME, FileHashes, SyncResult
from quantkit.publish.target import Target
from quantkit.workfolder import converted_branches, source_model

Say = Callable[[str], None]


class PublishOptions(BaseModel):
    """Where and how to publish: `quantkit publish`'s options, and the recipe's `[publish]` table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str | None = None  # the Hub repo USER/NAME (also named in the card)
    private: bool = False
    to: Path | None = None  # a local git repository instead of the Hub
    prompt_format: str | None = None  # the card's prompt format when the model's is unknown
    force: bool = False  # overwrite files on a branch that quantkit did not write


class PublishReport(BaseModel):
    """What publishing did: the target and, per branch, what was committed (`--format json` prints it)."""

    model_config = ConfigDict(frozen=True)

    target: str
    warnings: list[str]
    results: list[SyncResult]

    @property
    def commits(self) -> int:
        return sum(r.committed for r in self.results)


# ---- where to publish ------------------------------------------------------------------------------


class TargetChoice(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    target: Target
    warnings: list[str]  # to say on screen: the local default instead of the Hub, --private ignored


def choose_target(work: Path, *, repo: str | None, to: Path | None = None, private: bool = False) -> TargetChoice:
    """The Hub repo when a token is configured, else the local git repository `to` or WORK/hub-repo.

    Raises InvalidRepoId, HubOffline.
    """
    from quantkit import hub
    from quantkit.publish.git_target import GitTarget
    from quantkit.publish.hub_target import HubTarget, check_repo_id

    if repo is not None:
        check_repo_id(repo)
    warnings: list[str] = []
    target: Target
    if to is not None:
        target = GitTarget(to)
    elif repo is not None and hub.token():
        hub.ensure_reachable(repo)
        target = HubTarget(repo, private=private)
    else:
        to = work / "hub-repo"
        target = GitTarget(to)
        why = "no Hugging Face token configured" if repo is not None else "no Hub repo named"
        warnings.append(f"{why}: publishing into the local git repository {to} instead "
                        f"(inspect it with `git -C {to} log --all`; log in with `hf auth login` and rerun to publish to the Hub)")
    if private and isinstance(target, GitTarget):
        warnings.append("private applies to the Hub only; the local repository is yours alone")
    return TargetChoice(target=target, warnings=warnings)


# ---- the card --------------------------------------------------------------------------------------


def write_card(work: Path, repo: str | None, *, prompt_format: str | None = None) -> Path:
    """Render the card for `repo` into WORK/publish/README.md (rewritten only when it changed); without
    a repo the card names a placeholder USER/<model>-exl2."""
    from quantkit.card import card_spec, parse_card, render_card

    text = render_card(card_spec(work, repo=repo, override_format=prompt_format))
    parse_card(text)
    path = work / "publish" / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        write_text_atomic(path, text)  # a kill here leaves the old card or the new one, never half of it
    return path


def upload_bytes(work: Path, card: Path) -> int:
    """Everything a full publish uploads (main plus every branch), for the private-storage check."""
    files = list(engine.main_files(work, card).values())
    for b in converted_branches(work):
        files += list(engine.branch_files(work, b, card).values())
    return sum(p.stat().st_size for p in files)


# ---- publishing ------------------------------------------------------------------------------------


class Publisher:
    """One work folder's publishing to one target: `prepare()` once, then `publish_main()` and
    `publish_branch(b)` (from one thread at a time; `quantkit run` uses one worker)."""

    def __init__(self, work: Path, options: PublishOptions, *, target: Target | None = None, say: Say | None = None,
                 warn: Say | None = None) -> None:
        self.work = work
        self.options = options
        self.say = say or (lambda _m: None)
        self.warn = warn or (lambda m: self.say(f"warning: {m}"))
        if target is None:
            choice = choose_target(work, repo=options.repo, to=options.to, private=options.private)
            target, self.warnings = choice.target, list(choice.warnings)
        else:
            self.warnings = []
        self.target = target
        self.card: Path | None = None
        self.hashes = FileHashes()
        self.results: list[SyncResult] = []

    def prepare(self, *, reuse_card: bool = False) -> None:
        """The card, then (for the Hub) the pre-flight before any write, then the target itself.

        With `reuse_card` the card is written once per target: a resumed run reuses it, so branches
        published before a crash do not get a new README commit.

        Raises: the pre-flight's errors (NoHubToken, TokenCannotWrite, PrivateStorageExceeded, CardInvalid).
        """
        from quantkit.publish.hub_target import HubTarget
        from quantkit.source import hub_id

        for w in self.warnings:
            self.warn(w)
        card = self.work / "publish" / CARD_NAME
        if not (reuse_card and card.is_file() and engine.published(self.work, "main", self.target.id) is not None
                and self._on_main(card)):
            card = write_card(self.work, self.options.repo, prompt_format=self.options.prompt_format)
        self.card = card
        if isinstance(self.target, HubTarget):
            for line in self.target.preflight(upload_bytes=upload_bytes(self.work, card), source=hub_id(source_model(self.work)),
                                              card_text=card.read_text(encoding="utf-8")):
                self.say(line)
        self.target.prepare()

    def _on_main(self, card: Path) -> bool:
        """True when `card` is byte for byte the README that `main` holds: only then is a file on disk
        reused rather than rendered again (a kill could have left anything there)."""
        try:
            remote = self.target.list_files("main").get(CARD_NAME)
            return remote is not None and self.hashes.same(card, remote)
        except Exception:  # noqa: BLE001 - no target yet, or it cannot say: render the card again
            return False

    def publish_main(self) -> SyncResult:
        assert self.card is not None, "prepare() first"
        result = engine.publish_main(self.work, self.target, self.card, force=self.options.force, hashes=self.hashes)
        return self._done(result)

    def publish_branch(self, branch: str) -> SyncResult:
        assert self.card is not None, "prepare() first"
        result = engine.publish_branch(self.work, branch, self.target, card=self.card, force=self.options.force, hashes=self.hashes)
        return self._done(result)

    def _done(self, result: SyncResult) -> SyncResult:
        self.results.append(result)
        self.say(engine.said(result, self.target))
        return result

    def report(self) -> PublishReport:
        return PublishReport(target=self.target.id, warnings=self.warnings, results=list(self.results))


def publish_work(work: Path, options: PublishOptions, *, target: Target | None = None, say: Say | None = None,
                 warn: Say | None = None) -> PublishReport:
    """Publish a converted work folder: main, then every converted branch, each verified afterwards.

    Raises:
        WorkFolderIncomplete: nothing converted yet.
        the target's and the pre-flight's errors (see `Publisher.prepare`, `engine.sync_branch`).
    """
    branches = converted_branches(work)
    if not branches:
        raise WorkFolderIncomplete(work, "no converted branch in out/", f"run `quantkit convert MODEL --work {work}` first")
    for b in branches:
        engine.check_branch_name(b)
    publisher = Publisher(work, options, target=target, say=say, warn=warn)
    publisher.prepare()
    publisher.publish_main()
    for b in branches:
        publisher.publish_branch(b)
    return publisher.report()
