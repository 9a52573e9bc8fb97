"""The converter double's environment for module-scoped fixtures (monkeypatch is per test)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DOUBLE = Path(__file__).resolve().parent / "double" / "convert_exl2.py"


@contextmanager
def converter_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("QUANTKIT_CONVERTER", "QUANTKIT_CONVERTER_VERSION")}
    os.environ["QUANTKIT_CONVERTER"] = f"{sys.executable} {DOUBLE}"
    os.environ["QUANTKIT_CONVERTER_VERSION"] = "0.3.2+double"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
