"""Adapters for architectures exllamav2 0.3.2 lacks, registered as data (`../adapters.toml`).

The API the measure/convert pipeline calls:

    from quantkit.archs import adapters
    adapter = adapters.find(config)              # None: exllamav2 reads the model as it is
    plan = adapter.check(config)                 # refuses unmappable features, before any work
    copy = adapters.prepare(src_folder, dst)     # the working copy to point the converter at
    copy.plan.experimental                       # say so on screen and in the card until GPU-proven

`prepare()` never writes into `src`; see `workcopy.py` for the rules.
"""

from __future__ import annotations

import importlib
import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from quantkit.archs.adapters.base import (
    CONFIG_KEY,
    PROVENANCE_FILE,
    AdaptedModel,
    Adapter,
    AdapterEntry,
    AdapterPlan,
    Out,
    TensorInfo,
)

__all__ = [
    "AdaptedModel", "Adapter", "AdapterEntry", "AdapterPlan", "Out", "TensorInfo", "CONFIG_KEY", "PROVENANCE_FILE",
    "entries", "entry", "get", "find", "check", "prepare",
]


@lru_cache(maxsize=1)
def _registry() -> dict[str, AdapterEntry]:
    text = resources.files("quantkit.archs").joinpath("adapters.toml").read_text(encoding="utf-8")
    rows = tomllib.loads(text)["adapter"]
    return {name: AdapterEntry(source=name, **row) for name, row in rows.items()}


def entries() -> list[AdapterEntry]:
    return list(_registry().values())


def entry(arch: str) -> AdapterEntry | None:
    return _registry().get(arch)


def get(arch: str) -> Adapter | None:
    """The adapter registered for a source `architectures[0]`, or None."""
    row = entry(arch)
    if row is None:
        return None
    module = importlib.import_module(f"{__name__}.{row.adapter}")
    adapter: Adapter = module.ADAPTER
    return adapter


def _arch(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures")
    return str(archs[0]) if isinstance(archs, list) and len(archs) == 1 else None


def find(config: dict[str, Any]) -> Adapter | None:
    arch = _arch(config)
    return get(arch) if arch else None


def check(config: dict[str, Any]) -> AdapterPlan | None:
    """The plan for this config, None when no adapter is registered for it (raises AdapterRefused)."""
    adapter = find(config)
    return adapter.check(config) if adapter else None


def prepare(src: Path, dst: Path) -> AdaptedModel:
    """Working copy of the model folder `src` in `dst`, through the adapter its config.json names."""
    from quantkit.archs.adapters import workcopy  # numpy and safetensors' writer: only when copying
    from quantkit.errors import UnsupportedArchitecture

    config = workcopy.read_source_config(Path(src))
    adapter = find(config)
    if adapter is None:
        raise UnsupportedArchitecture(str(_arch(config)), "no quantkit adapter is registered for it")
    return workcopy.prepare(adapter, Path(src), Path(dst))
