"""exllamav2 0.3.2 on a CPU, for tests: its real converter and loader over a pure-PyTorch stand-in for its
CUDA extension (`exllamav2_ext.py`) and a device shim (`cpu_device.py`). See README.md here.

Entry points:
- `subprocess_env()`: the environment under which any Python process a test starts (quantkit's converter
  subprocess, a loader) imports exllamav2 on the CPU (`site/sitecustomize.py` does it);
- `on_cpu()`: a context manager for the test process itself; inside it `import exllamav2` works and
  `torch.cuda` claims one device; on exit `torch.cuda` is itself again;
- `exllamav2_logits(folder, ids)`: a load + forward through exllamav2's own code, inside `on_cpu()`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
SITE = HERE / "site"
#: Set (to "1") in the environment of child processes that must load the stand-in.
ENV = "QUANTKIT_TEST_EXL2_CPU"


def subprocess_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) with the stand-in's site folder first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(SITE)] + ([path] if path else []))
    env[ENV] = "1"
    return env


def _modules() -> tuple[ModuleType, ModuleType]:
    if str(HERE) not in sys.path:
        sys.path.append(str(HERE))
    import cpu_device
    import exllamav2_ext

    return cpu_device, exllamav2_ext


def ext() -> ModuleType:
    """The stand-in extension module (its `CALLS` counter shows which kernels ran in this process)."""
    return _modules()[1]


@contextlib.contextmanager
def on_cpu() -> Iterator[ModuleType]:
    """exllamav2 imported and usable in this process for the duration; yields the `exllamav2` module."""
    cpu_device, _ext = _modules()
    with cpu_device.cpu_cuda():
        import exllamav2

        yield exllamav2


def exllamav2_logits(folder: Path, ids: list[int], *, max_seq_len: int = 256) -> Any:
    """Logits (float32, one row per token) of `folder` (an EXL2 folder or an unquantized one) for one
    sequence, through exllamav2's own config, loader and forward; call inside `on_cpu()`. Set
    EXLLAMA_NO_SDPA first (`quantkit.exl2.runtime.exllamav2_env()`): the config reads it."""
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    cfg = ExLlamaV2Config(str(folder))
    cfg.max_seq_len = max(max_seq_len, len(ids))
    model = ExLlamaV2(cfg)
    model.load()
    try:
        with torch.no_grad():
            return model.forward(torch.tensor([ids])).float()[0]
    finally:
        model.unload()
