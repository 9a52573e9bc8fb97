"""A model's config.json: reading the file, and the one key reader everything else builds on.

`lookup(config, "num_key_value_heads", "n_kv_heads", "text_config->num_key_value_heads")` returns the
first key present, with `->` reaching into nested objects; a JSON null counts as absent (Starling's
`"sliding_window": null`), as it does for exllamav2's `config.read`. `MISSING` is the one sentinel: the
default that means "required", so the caller decides how to fail. The architecture table's per-field
aliases (`quantkit.archs.read_field`) and the adapters' readers are built on it.

A leaf module: it imports nothing of quantkit but the errors, so the model, the architecture table and
the adapters' working copy can all read config.json without importing one another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.errors import ConfigMissing, ConfigUnreadable


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: The one sentinel: "no such key" as a return value, "required" as a default.
MISSING: Any = _Missing()


def lookup(config: dict[str, Any], *keys: str, default: Any = MISSING) -> Any:
    """The value of the first of `keys` present and not null (`a->b` reaches into `a`); else `default`."""
    for key in keys:
        node: Any = config
        for part in key.split("->"):
            node = node.get(part, MISSING) if isinstance(node, dict) else MISSING
        if node is not MISSING and node is not None:
            return node
    return default


def read_config_file(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, as a JSON object.

    Raises:
        ConfigMissing, ConfigUnreadable.
    """
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ConfigMissing(folder)
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigUnreadable(cfg, f"cannot read it ({exc.__class__.__name__}: {exc})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigUnreadable(cfg, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise ConfigUnreadable(cfg, "not a JSON object")
    return data
