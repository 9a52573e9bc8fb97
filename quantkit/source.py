"""Who the source model is on the Hub: its repo id (the card's `base_model`) and revision, however the
user named it (a Hub id, or a local folder)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def hub_id(ref: str | None) -> str | None:
    """`ref` when it is a Hub repo id USER/NAME (and not an existing local path), else None."""
    if not ref or ref.count("/") != 1 or Path(ref).expanduser().exists():
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref
