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


def published_name(ref: str, folder: str | Path | None = None) -> str:
    """How files quantkit publishes name the source model: its Hub id (also for a folder in the Hugging
    Face cache, `.../models--ORG--NAME/snapshots/REV`), else the name of its folder. Never a local path.

    Args:
        ref: the model as the user named it (a Hub id or a path).
        folder: the folder the weights were read from, when there is one.
    """
    if hub_id(ref) is not None:
        return ref
    for candidate in (Path(ref), Path(folder) if folder is not None else None):
        if candidate is None:
            continue
        parts = candidate.expanduser().parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3].removeprefix("models--").replace("--", "/")
    return Path(ref).expanduser().resolve().name or ref
