"""The one seam to the Hugging Face Hub.

Everything quantkit asks of the Hub goes through `get_hf_api()`, so tests patch one function and
assert the exact calls. `ensure_reachable` fails fast when offline: huggingface_hub's own HTTP layer
retries a failed DNS lookup five times with back-off (about 25 s) before it gives up.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants

from quantkit.errors import HubOffline


def get_hf_api() -> HfApi:
    return HfApi()


def ensure_reachable(repo_id: str, *, timeout: float = 3.0) -> None:
    """Raise `HubOffline` at once when the Hub cannot be reached, instead of a stack of retries."""
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        raise HubOffline(repo_id)
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise HubOffline(repo_id) from exc


def cached_file(repo_id: str, filename: str, *, revision: str | None = None) -> Path | None:
    """A file of `repo_id` at `revision` (a branch, tag or commit) already in the local Hugging Face cache,
    or None. No network: this is what an offline planner reads."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def token() -> str | None:
    """The configured Hugging Face token (HF_TOKEN or `hf auth login`), or None."""
    from huggingface_hub import get_token

    return get_token()


def validate_card(text: str) -> None:
    """The Hub's own check of a card's metadata (`ModelCard.validate`, a POST to /api/validate-yaml).

    Online only: `quantkit publish` calls it in its Hub pre-flight. Raises ValueError when invalid."""
    from huggingface_hub import ModelCard

    ModelCard(text).validate()
