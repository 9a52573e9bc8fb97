"""Every error issue 5 added has a one-line message with a remedy in ERROR_TABLE."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit import errors as e
from quantkit.cli.errors import ERROR_TABLE, format_error

CASES = [
    (e.UnknownPromptFormat("x", ["chatml"]), "--prompt-format"),
    (e.WorkFolderIncomplete(Path("w"), "no measurement.json", "run `quantkit measure` first"), "quantkit measure"),
    (e.InvalidRepoId("a b", "bad"), "USER/NAME"),
    (e.InvalidBranchName("6 5"), "letters, digits"),
    (e.NoHubToken(), "hf auth login"),
    (e.TokenCannotWrite("org", "bob", "read-only"), "write token"),
    (e.HubRequestFailed("create_commit", 403, "forbidden"), "rerun"),
    (e.ForeignFiles("hub:a/b", "6_5", ["NOTES.md"]), "--force"),
    (e.BranchVerifyFailed("hub:a/b", "main", ["README.md"], []), "rerun"),
    (e.PrivateStorageExceeded(200 * 10**9, 100 * 10**9, "free"), "without --private"),
    (e.GitFailed(["commit-tree"], "boom"), "local target"),
    (e.LocalTargetDirty(Path("r"), ["README.md"]), "commit or stash"),
    (e.CardInvalid("bad yaml"), "fix"),
]


@pytest.mark.parametrize(("exc", "remedy"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_one_line_with_remedy(exc: e.QuantkitError, remedy: str) -> None:
    assert type(exc) in ERROR_TABLE
    text = format_error(exc)
    assert "\n" not in text and remedy in text
