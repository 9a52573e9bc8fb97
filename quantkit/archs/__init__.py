"""Architecture support as data (`exllamav2.toml` beside this file) and the one config reader.

`resolve(config)` is the only way into the table: it returns the `ArchSpec` for
`config["architectures"][0]` or raises `UnsupportedArchitecture` naming the reason, before any work.
exllamav2 itself warns and then loads unknown architectures as Llama; quantkit refuses instead.

Architectures exllamav2 lacks but an adapter maps (`adapters.toml`, `quantkit.archs.adapters`) resolve to
the adapter's target: `resolve_model(config)` returns that spec with the adapted config.json to read
the shape from, and the adapter's plan.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from quantkit.errors import UnsupportedArchitecture
from quantkit.hfconfig import MISSING, lookup

__all__ = ["ArchSpec", "Refusal", "Resolved", "resolve", "resolve_model", "supported", "refused", "field_aliases", "read_field"]


class ArchSpec(BaseModel):
    """How exllamav2 0.3.2 builds one architecture, as far as sizing and conversion need it."""

    model_config = ConfigDict(frozen=True)

    name: str
    family: str
    norm: Literal["rmsnorm", "layernorm"]
    mlp: Literal["gated", "plain"]
    act: Literal["silu", "gelu"]
    qkv: Literal["split", "fused"]
    rope: Literal["neox", "gptj", "none"]
    moe: bool
    mqa: bool
    parallel_decoder: bool
    alternating_swa: bool
    lm_head_tied_key: bool
    tied_default: bool
    experimental: bool
    requires: str | None = None
    note: str | None = None
    default_vocab: int | None = None
    default_head_dim: int | None = None
    default_heads: int | None = None
    default_kv_heads: int | None = None
    default_inner_dim_mult: int | None = None
    default_max_positions: int = 2048


class Refusal(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    family: str
    reason: str


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("exllamav2.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def supported() -> list[ArchSpec]:
    t = _table()
    return [ArchSpec(name=name, **(t["defaults"] | entry)) for name, entry in t["arch"].items()]


def refused() -> list[Refusal]:
    return [Refusal(name=name, **entry) for name, entry in _table()["refused"].items()]


def field_aliases(field: str) -> list[str]:
    return list(_table()["fields"][field])


def read_field(config: dict[str, Any], field: str, default: Any = MISSING) -> Any:
    """Read one hyperparameter the way exllamav2's `config.read` does.

    Tries each alias of `field` at the top level, then under `text_config` (exllamav2's opt_subkey for
    VLMs). A JSON null counts as absent (Starling's `"sliding_window": null`). Returns `default` when no
    alias is present; with the `MISSING` default the caller decides how to fail.
    """
    aliases = field_aliases(field)
    for scope in (config, config.get("text_config") or {}):
        value = lookup(scope, *aliases)
        if value is not MISSING:
            return value
    return default


class NativeOverride(BaseModel):
    """A model whose config.json claims more context than its weights were trained for."""

    model_config = ConfigDict(frozen=True)

    repo: str
    native: int
    claimed: int
    reason: str


@lru_cache(maxsize=1)
def _native_table() -> dict[str, Any]:
    return tomllib.loads(resources.files(__package__).joinpath("native_context.toml").read_text(encoding="utf-8"))


def native_override(config: dict[str, Any], ref: str | None, claimed: int) -> NativeOverride | None:
    """The `native_context.toml` entry for this model (by "_name_or_path" or the Hub id), if its config still
    claims the edited length."""
    for key in (config.get("_name_or_path"), ref):
        entry = _native_table().get(key) if isinstance(key, str) else None
        if entry is not None and entry["claimed"] == claimed:
            return NativeOverride(repo=key, **entry)
    return None


class Resolved(BaseModel):
    """What exllamav2 will build for a config: its table entry, the config.json it will read (the
    adapted one when an adapter applies) and the adapter's plan (None when the model is read as it is)."""

    model_config = ConfigDict(frozen=True)

    spec: ArchSpec
    config: dict[str, Any]
    adapter: Any = None  # AdapterPlan | None (typed loosely: the adapters package imports this module)


def resolve_model(config: dict[str, Any]) -> Resolved:
    """`resolve`, with adapters: an adapted architecture resolves to its target, after the adapter's check
    (which raises `AdapterRefused`, an `UnsupportedArchitecture`, naming a feature it cannot map)."""
    from quantkit.archs import adapters

    plan = adapters.check(config) if isinstance(config.get("architectures"), list) and len(config["architectures"]) == 1 else None
    if plan is None:
        return Resolved(spec=_resolve_table(config), config=config)
    return Resolved(spec=_resolve_table(plan.config), config=plan.config, adapter=plan)


def resolve(config: dict[str, Any]) -> ArchSpec:
    """The table entry exllamav2 will build for this config (an adapter's target when one applies), or
    `UnsupportedArchitecture` with the reason. Read the shape from `resolve_model(config).config`."""
    return resolve_model(config).spec


def _resolve_table(config: dict[str, Any]) -> ArchSpec:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise UnsupportedArchitecture("(none)", "config.json has no \"architectures\" list")
    if len(archs) != 1:
        # exllamav2: assert len(read_config["architectures"]) == 1
        raise UnsupportedArchitecture(", ".join(map(str, archs)), "exllamav2 needs exactly one entry in \"architectures\"")
    name = str(archs[0])
    by_name = {a.name: a for a in supported()}
    if name in by_name:
        spec = by_name[name]
        if spec.requires:
            path, _, want = spec.requires.partition("=")
            got = lookup(config, path)
            if got != want:
                raise UnsupportedArchitecture(
                    name, f"exllamav2 0.3.2 recognises it only with {path.replace('->', '.')} = {want!r} (found {got if got is not MISSING else 'none'!r})"
                )
        return spec
    for r in refused():
        if r.name == name:
            raise UnsupportedArchitecture(name, r.reason)
    raise UnsupportedArchitecture(name, "not an architecture exllamav2 0.3.2 recognises; it would load it as Llama and produce garbage or fail")
