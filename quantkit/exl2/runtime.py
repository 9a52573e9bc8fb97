"""The environment of every exllamav2 process quantkit starts (converter, loader, eval).

exllamav2 0.3.2's torch-SDPA attention (`attn.py` `_attn_torch`), taken when neither flash-attn nor
xformers is importable, is not causal: with `causal=True` it passes `attn_params.get_block_diag_mask()` as
the mask, which is None outside packed batches, and never sets `is_causal`, so every prompt token attends
to the later ones, in the converter's measurement and quantisation passes too. `EXLLAMA_NO_SDPA` (read by
`config.py` into `no_sdpa`) sends it to its matmul path, which builds the causal mask. Seen on the CPU
through exllamav2's own code (tests/test_exl2_cpu.py); the path does not depend on the device.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

NO_SDPA = "EXLLAMA_NO_SDPA"
#: Said once per process on screen when quantkit sets NO_SDPA.
NO_SDPA_NOTICE = ("neither flash-attn nor xformers is installed: exllamav2 runs with EXLLAMA_NO_SDPA=1, because its "
                  "SDPA attention is not causal (install flash-attn for the fast path)")

_said = False


def causal_attention_installed() -> bool:
    """flash-attn or xformers importable: exllamav2 then takes a causal attention of its own."""
    return any(importlib.util.find_spec(name) is not None for name in ("flash_attn", "xformers"))


def exllamav2_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) as every exllamav2 process quantkit starts must see it."""
    env = dict(os.environ if base is None else base)
    if not causal_attention_installed():
        env[NO_SDPA] = "1"
    return env


def notice_once() -> str | None:
    """The notice to show on screen the first time in this process that quantkit sets NO_SDPA, else None."""
    global _said
    if _said or causal_attention_installed():
        return None
    _said = True
    return NO_SDPA_NOTICE
