"""The error table: every typed error the core raises has a row, and each message names the fix."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from quantkit import errors as e
from quantkit.cli.errors import ERROR_TABLE, format_error

SAMPLES = [
    (e.ConfigMissing(Path("m")), "no config.json in m: point MODEL at"),
    (e.ConfigUnreadable(Path("m/config.json"), "not valid JSON"), "m/config.json: not valid JSON; fix or re-download"),
    (e.MissingConfigKey("LlamaForCausalLM", "hidden", ["hidden_size", "d_model"]), "has no hidden (looked for hidden_size, d_model): add it"),
    (e.UnsupportedArchitecture("BertModel", "why"), "architecture BertModel is not supported: why. `quantkit archs`"),
    (e.InvalidBits("9", "too high"), "bits 9: too high; pass e.g. --bits"),
    (e.InvalidHeadBits("7"), "use 2, 3, 4, 5, 6 or 8"),
    (e.InvalidContext("4x", "bad"), "context 4x: bad; e.g. --context 4k"),
    (e.UnknownCacheMode("q5", ["fp16", "q4"]), "use one of fp16, q4"),
    (e.InvalidSize("lots"), "write it like 24GiB"),
    (e.HubOffline("a/b"), "download the model's config.json into a folder"),
    (e.HubRepoNotFound("a/b"), "check the repo id"),
    (e.ModelNotFound("x"), "pass a model folder or an id like user/model"),
    (e.CorruptSafetensors("s.safetensors", "bad header"), "re-download or re-convert"),
]


@pytest.mark.parametrize("exc, text", SAMPLES, ids=[type(x).__name__ for x, _ in SAMPLES])
def test_message(exc, text):
    msg = format_error(exc)
    assert text in msg and "\n" not in msg


def test_every_error_class_has_a_row():
    classes = {c for _, c in inspect.getmembers(e, inspect.isclass) if issubclass(c, e.QuantkitError)}
    # Bases that only group others (QuantkitError, CalibrationError) are never raised themselves.
    bases = {c for c in classes if any(o is not c and issubclass(o, c) for o in classes) and "__init__" not in vars(c)}
    assert classes - bases <= set(ERROR_TABLE), (classes - bases) - set(ERROR_TABLE)


def test_unexpected_errors_still_one_line():
    assert "QUANTKIT_DEBUG=1" in format_error(KeyError("x"))
