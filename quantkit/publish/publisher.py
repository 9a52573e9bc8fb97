"""The publish stage's one entry point, shared by `quantkit publish` and `quantkit run`.

`Publisher` prepares a work folder's publishing (where to, the base model, the Hub's pre-flight) and
lands converted branches one at a time. `publish_work` is the whole stage in one call (`quantkit
publish`); `quantkit run` drives the same `Publisher` from a background worker (`background.py`).

The card is always current: it lists only the branches already on the target, with their real sizes.
Landing a branch commits it with a card that lists it, then brings `main` (published after the first
branch, never before) and every earlier branch's README up to date, one commit per branch that
changed and none where nothing did.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.errors import BaseModelUnknown, WorkFolderIncomplete
from quantkit.files import write_text_atomic
from quantkit.publish import engine
from quantkit.publish.engine import CARD_NAME, COMMIT_PREFIX, FileHashes, SyncResult
from quantkit.publish.target import Target
from quantkit.workfolder import converted_branches

Say = Callable[[str], None]


class PublishOptions(BaseModel):
    """Where and how to publish: `quantkit publish`'s options; `quantkit run`'s come from its flags and
    the recipe (`[publish]` holds repo, private, to, prompt_format; `base_model` is top-level)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str | None = None  # the Hub repo USER/NAME (also named in the card)
    private: bool = False
    to: Path | None = None  # a local git repository instead of the Hub
    prompt_format: str | None = None  # the card's prompt format when the model's is unknown
    force: bool = False  # overwrite files on a branch that quantkit did not write
    base_model: str | None = None  # the source's Hub id, when the work folder does not know it
    no_base_model: bool = False  # publish to the Hub without a base_model all the same


class PublishReport(BaseModel):
    """What publishing did, for people and for `--format json`."""

    model_config = ConfigDict(frozen=True)

    target: str  # hub:USER/NAME or git:/path
    url: str | None  # the Hub repo's page
    path: str | None  # the local git repository
    lfs: bool | None  # the local repository stores big files with git-lfs
    branches: list[str]  # on the target and listed in the card, in the card's order
    commits: list[SyncResult]  # every sync, in order; `committed` says whether it made a commit
    push: list[str]  # commands that push a local repository to the Hub
    warnings: list[str]

    @property
    def commit_count(self) -> int:
        return sum(r.committed for r in self.commits)


# ---- where to publish ------------------------------------------------------------------------------


class TargetChoice(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    target: Target
    warnings: list[str]  # to say on screen: --private ignored


def choose_target(options: PublishOptions) -> TargetChoice:
    """The local git repository `to` when given, else the Hub repo, which needs a token: there is no
    silent local fallback.

    Raises:
        InvalidRepoId, NoHubToken, HubOffline, LocalTargetNotRepo.
    """
    from quantkit import hub
    from quantkit.errors import NoHubToken
    from quantkit.publish.git_target import GitTarget
    from quantkit.publish.hub_target import HubTarget, check_repo_id

    if options.repo is not None:
        check_repo_id(options.repo)
    warnings: list[str] = []
    target: Target
    if options.to is not None:
        target = GitTarget(options.to)
        target.check_usable()
        if options.private:
            warnings.append("--private applies to the Hub only; the local repository is yours alone")
    elif options.repo is not None:
        if not hub.token():
            raise NoHubToken(options.repo)
        hub.ensure_reachable(options.repo)
        target = HubTarget(options.repo, private=options.private)
    else:
        raise ValueError("publish where? name a Hub repo or a local git repository")
    return TargetChoice(target=target, warnings=warnings)


# ---- publishing ------------------------------------------------------------------------------------


class Publisher:
    """One work folder's publishing to one target: `prepare()` once, then `land(branch)` per converted
    branch, from one thread at a time (`quantkit run` uses one worker)."""

    def __init__(self, work: Path, options: PublishOptions, *, target: Target | None = None, say: Say | None = None,
                 warn: Say | None = None) -> None:
        self.work = work
        self.options = options
        self.say = say or (lambda _m: None)
        self.warn = warn or (lambda m: self.say(f"warning: {m}"))
        if options.base_model is not None:
            from quantkit.source import check_hub_id

            check_hub_id(options.base_model)
        if target is None:
            choice = choose_target(options)
            target, self.warnings = choice.target, list(choice.warnings)
        else:
            self.warnings = []
        self.target = target
        self.hashes = FileHashes()
        self.listed: list[str] = []  # branches on the target, as the published card lists them
        self.card: Path | None = None  # the card as last written (WORK/publish/README.md)
        self.results: list[SyncResult] = []
        self._notes_said = False

    # ---- the card ----------------------------------------------------------------------------------

    def card_text(self, branches: list[str]) -> str:
        """The card listing `branches` (none: the planned card, from the source model)."""
        from quantkit.card import card_spec, parse_card, render_card

        spec = card_spec(self.work, repo=self.options.repo, override_format=self.options.prompt_format,
                         base_model=self.options.base_model, branches=branches)
        if spec.base_model is None and self._is_hub() and not self.options.no_base_model:
            raise BaseModelUnknown(str(spec.source))
        if not self._notes_said:
            for note in spec.notes:
                self.warn(note)
            self._notes_said = True
        text = render_card(spec)
        parse_card(text)
        return text

    def write_card(self, branches: list[str]) -> Path:
        """WORK/publish/README.md listing `branches`, rewritten only when it changes."""
        return self._write_card_text(self.card_text(branches))

    def _write_card_text(self, text: str) -> Path:
        path = self.work / "publish" / CARD_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
            write_text_atomic(path, text)  # a kill here leaves the old card or the new one, never half of it
        self.card = path
        return path

    def _is_hub(self) -> bool:
        from quantkit.publish.hub_target import HubTarget

        return isinstance(self.target, HubTarget)

    # ---- the stage ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Before any write: the base model, the Hub's pre-flight (token, namespace, private storage,
        source, card), then the target itself; and which branches it already holds.

        The card is rendered anew every time: a card on disk may be stale, or half of one after a kill.

        Raises: BaseModelUnknown, and the pre-flight's errors (NoHubToken, TokenCannotWrite,
        PrivateStorageExceeded, CardInvalid).
        """
        from quantkit.publish.hub_target import HubTarget
        from quantkit.source import read_source
        from quantkit.workfolder import read_state

        read_state(self.work)  # a folder of another format is refused before anything is said or written
        for w in self.warnings:
            self.warn(w)
        converted = converted_branches(self.work)
        text = self.card_text(converted)  # refuses a Hub publish without base_model before any write
        self._write_card_text(text)
        if isinstance(self.target, HubTarget):
            record = read_source(self.work)
            source = self.options.base_model or (record.hub_id if record is not None else None)
            for line in self.target.preflight(upload_bytes=self._upload_bytes(converted), source=source,
                                              card_text=text):
                self.say(line)
        self.target.prepare()
        remote = self.target.branches()
        self.listed = [b for b in converted if b in remote and self._verified(b)]

    def _verified(self, branch: str) -> bool:
        record = engine.published(self.work, branch, self.target.id)
        return record is not None and record.verified

    def publish_main(self) -> SyncResult:
        """`main` with the card `prepare()` wrote: for a driver whose branches are published elsewhere
        (quantkit.cluster)."""
        assert self.card is not None, "prepare() first"
        return self._done(engine.publish_main(self.work, self.target, self.card, force=self.options.force, hashes=self.hashes))

    def _upload_bytes(self, branches: list[str]) -> int:
        files = [p for p in (self.work / n for n in engine.MAIN_FILES) if p.is_file()]
        for b in branches:
            files += [p for p in (self.work / "out" / b).rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files)

    def land(self, branch: str) -> list[SyncResult]:
        """Publish WORK/out/<branch> with a card listing it and the branches already there, then bring
        `main` and the other listed branches up to date with that card."""
        engine.check_branch_name(branch)
        converted = converted_branches(self.work)
        listed = [b for b in converted if b in self.listed or b == branch]
        card = self.write_card(listed)
        done = [self._done(engine.publish_branch(self.work, branch, self.target, card=card, force=self.options.force,
                                                 hashes=self.hashes))]
        self.listed = listed
        readme = _readme_message(listed)
        done.append(self._done(engine.publish_main(self.work, self.target, card, force=self.options.force, hashes=self.hashes,
                                                   message=readme if engine.published(self.work, "main", self.target.id) else None)))
        for other in listed:
            if other != branch:
                done.append(self._done(engine.publish_branch(self.work, other, self.target, card=card, force=self.options.force,
                                                             hashes=self.hashes, message=readme)))
        return done

    def _done(self, result: SyncResult) -> SyncResult:
        self.results.append(result)
        if result.committed or result.branch not in {r.branch for r in self.results[:-1]}:
            self.say(engine.said(result, self.target))
        return result

    def report(self) -> PublishReport:
        from quantkit.publish.git_target import GitTarget

        git = self.target if isinstance(self.target, GitTarget) else None
        return PublishReport(
            target=self.target.id,
            url=f"https://huggingface.co/{self.options.repo}" if self._is_hub() else None,
            path=str(git.path) if git is not None else None,
            lfs=git.lfs if git is not None else None,
            branches=["main", *self.listed] if self.listed else [],
            commits=list(self.results),
            push=git.push_commands(self.options.repo) if git is not None else [],
            warnings=self.warnings,
        )


def _readme_message(listed: list[str]) -> engine.Message:
    def message(adds: list[str], deletes: list[str]) -> str:
        if adds == [CARD_NAME] and not deletes:
            return f"{COMMIT_PREFIX}: README lists {', '.join(listed)}"
        return f"{COMMIT_PREFIX}: {', '.join(adds + deletes)}"

    return message


def publish_work(work: Path, options: PublishOptions, *, target: Target | None = None, say: Say | None = None,
                 warn: Say | None = None) -> PublishReport:
    """Publish a converted work folder: each converted branch lands in turn (see `Publisher.land`),
    `main` after the first, every branch verified afterwards.

    Raises:
        WorkFolderIncomplete: nothing converted yet.
        BaseModelUnknown, the target's and the pre-flight's errors (see `Publisher.prepare`,
        `engine.sync_branch`).
    """
    from quantkit.eval.core import failed_branches

    failed = failed_branches(work)
    branches = [b for b in converted_branches(work) if b not in failed]
    if not branches:
        raise WorkFolderIncomplete(work, "no converted branch in out/", f"run `quantkit convert MODEL --work {work}` first")
    for b in branches:
        engine.check_branch_name(b)
    for b in failed:
        (warn or say or (lambda _m: None))(f"{b} is not published: its evaluation failed (see {work / 'eval.json'})")
    publisher = Publisher(work, options, target=target, say=say, warn=warn)
    publisher.prepare()
    for b in branches:
        publisher.land(b)
    return publisher.report()
