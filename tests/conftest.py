"""Offline by construction: every test runs with the Hub unreachable and a private HF home."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIGS = FIXTURES / "configs"
#: The smallest Llama shapes the real converter (on the CPU stand-in) takes quickly.
EXL2_TINY = {"hidden": 64, "intermediate": 128, "heads": 2, "kv_heads": 1, "peaked": True}


@pytest.fixture(autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("QUANTKIT_HOME", str(home / "quantkit"))
    monkeypatch.delenv("QUANTKIT_DEBUG", raising=False)


def model_folder(tmp_path: Path, config: dict | str | Path, name: str = "model") -> Path:
    """A model folder holding just config.json (from a dict, or a fixture file name / path)."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        (folder / "config.json").write_text(json.dumps(config))
    else:
        src = Path(config)
        if not src.is_absolute():
            src = CONFIGS / src
        shutil.copy(src, folder / "config.json")
    return folder


def load_gpu_script(name: str) -> ModuleType:
    """A module of scripts/gpu/ (plain scripts, not a package), imported once per test session."""
    key = f"gpu_script_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "scripts" / "gpu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod
DOUBLE = Path(__file__).resolve().parent / "double" / "convert_exl2.py"


@pytest.fixture
def converter_double(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point quantkit's converter seam at the test double (the product code has no mock)."""
    import sys

    monkeypatch.setenv("QUANTKIT_CONVERTER", f"{sys.executable} {DOUBLE}")
    monkeypatch.setenv("QUANTKIT_CONVERTER_VERSION", "0.3.2+double")
    # The double's branches are not loadable by exllamav2: `quantkit run`'s eval step talks to a double too.
    monkeypatch.setenv("QUANTKIT_EVAL_WORKER", f"{sys.executable} {DOUBLE.parent / 'eval_worker.py'}")
    for var in ("QK_DOUBLE_FAIL_AT", "QK_DOUBLE_FAIL_MODE", "QK_DOUBLE_DELAY"):
        monkeypatch.delenv(var, raising=False)
    return DOUBLE


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def real_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    """quantkit's converter seam left as shipped (`python -m exllamav2.conversion.convert_exl2`): the child
    runs exllamav2 0.3.2's real converter on the CPU through tests/exl2_cpu (stand-in extension + device
    shim, loaded by its sitecustomize). Here, `torch.cuda.is_available()` says yes so quantkit's pre-flight
    passes as on a GPU machine."""
    import torch

    from exl2_cpu import subprocess_env

    for var in ("QUANTKIT_CONVERTER", "QUANTKIT_CONVERTER_VERSION"):
        monkeypatch.delenv(var, raising=False)
    for key, value in subprocess_env().items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def exl2_on_cpu() -> Iterator[ModuleType]:
    """exllamav2 0.3.2 imported in this test process on the CPU (stand-in extension + device shim); yields
    the `exllamav2` module. `torch.cuda` is restored afterwards. See tests/exl2_cpu/README.md."""
    from exl2_cpu import on_cpu

    with on_cpu() as exllamav2:
        yield exllamav2


@pytest.fixture(scope="session")
def tiny_llama_exl2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest Llama shapes exllamav2's converter takes, for the real-converter tests."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama-exl2", **EXL2_TINY)
