"""Run exllamav2 0.3.2's hard-coded CUDA on the CPU: a torch function mode and `torch.cuda` stubs.

exllamav2 names `cuda:0` ~50 times (`conversion/*.py`, model, device, attention, linear, the loader) and
calls `.cuda()` and `torch.cuda.*`. A `TorchFunctionMode` rewrites every CUDA device argument to the CPU
and computes fp16 GEMMs in fp32 (what a CUDA fp16 GEMM does, fp32 accumulate and an fp16 result; a CPU
fp16 GEMM is ~20x slower). The `torch.cuda` stubs report one 64 GiB device. This depends on torch
internals (`TorchFunctionMode`); it is test infrastructure, never imported by quantkit.

`install()` is for a process of its own (the converter under `site/sitecustomize.py`); `cpu_cuda()` is the
reversible form for a test process (see `tests/exl2_cpu/__init__.py`).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

REDIRECTS: collections.Counter[str] = collections.Counter()

_GEMMS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
          torch.Tensor.bmm, torch.nn.functional.linear}


def _is_cuda(d: Any) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and d.startswith("cuda")


class CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if (func in _GEMMS and not kwargs and len(args) >= 2 and isinstance(args[0], torch.Tensor)
                and isinstance(args[1], torch.Tensor) and args[0].dtype == args[1].dtype == torch.float16):
            REDIRECTS["fp16 gemm in fp32"] += 1
            return func(*[a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]).half()
        name = getattr(func, "__name__", "")
        if func is torch.device and args and ((isinstance(args[0], int) and not isinstance(args[0], bool)) or _is_cuda(args[0])):
            REDIRECTS["torch.device(cuda)"] += 1
            return torch.device("cpu")
        if name == "cuda":  # Tensor.cuda()
            REDIRECTS["Tensor.cuda"] += 1
            return args[0]
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or (isinstance(kwargs["device"], int) and not isinstance(kwargs["device"], bool))):
            REDIRECTS[f"{name}(device=cuda)"] += 1
            kwargs["device"] = "cpu"
        if name == "to":
            new = []
            for i, a in enumerate(args):
                if _is_cuda(a) or (i > 0 and isinstance(a, int) and not isinstance(a, bool)):
                    REDIRECTS["Tensor.to(cuda)"] += 1
                    a = "cpu"
                new.append(a)
            args = tuple(new)
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, *_a: Any) -> None:
        pass


class _Props:
    major, minor, name, total_memory, multi_processor_count = 9, 0, "exl2-cpu-standin", 64 * 1024**3, 1


class _Ctx:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def __enter__(self) -> _Ctx:
        return self

    def __exit__(self, *_a: Any) -> bool:
        return False


#: torch.cuda attribute -> the stand-in (one device, 64 GiB, nothing to synchronise).
CUDA_STUBS: dict[str, Any] = {
    "is_available": lambda: True,
    "device_count": lambda: 1,
    "current_device": lambda: 0,
    "synchronize": lambda *a, **k: None,
    "empty_cache": lambda: None,
    "set_device": lambda *a, **k: None,
    "set_stream": lambda *a, **k: None,
    "current_stream": lambda *a, **k: _Stream(),
    "Stream": _Stream,
    "device": _Ctx,
    "stream": _Ctx,
    "get_device_properties": lambda *a, **k: _Props(),
    "get_device_capability": lambda *a, **k: (9, 0),
    "get_device_name": lambda *a, **k: _Props.name,
    "mem_get_info": lambda *a, **k: (60 * 1024**3, 64 * 1024**3),
    "memory_allocated": lambda *a, **k: 0,
    "max_memory_allocated": lambda *a, **k: 0,
    "reset_peak_memory_stats": lambda *a, **k: None,
}


def install() -> None:
    """For the whole process (a converter or loader started for a test): stubs and mode, never undone."""
    for name, value in CUDA_STUBS.items():
        setattr(torch.cuda, name, value)
    CudaToCpu().__enter__()


@contextlib.contextmanager
def cpu_cuda() -> Iterator[None]:
    """The same, undone on exit (a test process must get its real `torch.cuda` back)."""
    saved = {name: getattr(torch.cuda, name) for name in CUDA_STUBS}
    for name, value in CUDA_STUBS.items():
        setattr(torch.cuda, name, value)
    try:
        with CudaToCpu():
            yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
