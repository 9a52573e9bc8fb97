"""Installed as users install it: the wheel holds every package and the data folders, and an installed
quantkit finds its named branch sets and calibration recipes. (.ci/run also reruns the CLI tests against
the built wheel, outside the checkout.)"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from quantkit import branches, calibration

REPO = Path(__file__).resolve().parent.parent


def test_every_package_of_the_source_tree_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "quantkit").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert sorted(found - listed) == []


def test_an_installed_quantkit_finds_its_data(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("quantkit._calibration") is None:
        pytest.skip("quantkit is not installed here (only on PYTHONPATH): the data packages exist once installed")
    # As installed: no checkout folders beside the package, so the packaged copies are used.
    monkeypatch.setattr(branches, "__file__", "/nonexistent/site-packages/quantkit/branches.py")
    folder = branches.data_dir("calibration")
    assert folder.is_dir() and (folder / "default.toml").is_file()
    assert calibration.load_recipe("default")[0].name == "default"
    assert [b.name for b in branches.default_branches()] == ["8_0", "6_5", "5_0"]
