"""The one seam to exllamav2's loader and forward pass (and transformers', for a reference on the CPU).

Only the evaluation worker imports this module, inside its own process: torch and exllamav2 are imported
in the functions that need them. Three ways to get logits, the worker picks one from the memory plan:

- `Exl2Model(folder, layers=False)`: `ExLlamaV2Config` + `ExLlamaV2.load()` + `forward()`, the way a user
  loads the branch; the model stays loaded while every row goes through it.
- `Exl2Model(folder, layers=True)`: one module at a time, as exllamav2's measurement does
  (`conversion/measure.py`: `ExLlamaV2(config)` unloaded, then `module.load()` / `forward` / `unload()`),
  every row's hidden state kept in system RAM between modules. Only the largest module has to fit.
- `transformers_logits`: the unquantized source in float32 on the CPU, for a reference that fits neither.

exllamav2 reads `EXLLAMA_NO_SDPA` when `attn.py` is imported; the worker's environment sets it (see
`quantkit.exl2.runtime`), never this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Exl2Model:
    """A folder exllamav2 can load (an EXL2 branch or an unquantized HF model), as a logits function."""

    def __init__(self, folder: Path, *, max_len: int, layers: bool = False) -> None:
        from exllamav2 import ExLlamaV2, ExLlamaV2Config

        self.config = ExLlamaV2Config(str(folder))
        self.config.max_seq_len = max(max_len, 256)
        self.config.max_input_len = max(max_len, 256)
        self.config.max_attention_size = max(max_len, 256) ** 2
        self.model = ExLlamaV2(self.config)
        self.layers = layers
        self.vocab = self.config.vocab_size
        # lazy: the device map only, as the converter does (convert_exl2.py); modules load one at a time
        self.model.load(lazy=layers)

    def logits(self, rows: list[Any]) -> Iterator[Any]:
        """float32 logits (tokens x vocab) per row of token ids (1-D int tensors), in order."""
        import torch

        with torch.inference_mode():
            if not self.layers:
                for ids in rows:
                    yield self.model.forward(ids.view(1, -1).long()).float()[0, :, : self.vocab].cpu()
            else:
                yield from self._by_module(rows)

    def _by_module(self, rows: list[Any]) -> Iterator[Any]:
        from exllamav2.attn import ExLlamaV2Attention

        states: list[Any] = [ids.view(1, -1).long() for ids in rows]
        for module in self.model.modules:
            module.load()
            for i, x in enumerate(states):
                params = ExLlamaV2Attention.Params(1, x.shape[1], 0, None, None)
                y = module.forward(x.to(module.device()), cache=None, attn_params=params, past_len=0)
                states[i] = y.cpu()
            module.unload()
        for x in states:
            yield x.float()[0, :, : self.vocab]

    def close(self) -> None:
        if not self.layers:
            self.model.unload()


def transformers_logits(folder: Path, rows: list[Any]) -> Iterator[Any]:
    """The source model's float32 logits on the CPU, row by row (transformers, not exllamav2)."""
    import torch

    try:
        import transformers
    except ImportError:
        raise RuntimeError("the reference on the CPU needs transformers: pip install transformers") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        for ids in rows:
            yield model(ids.view(1, -1).long()).logits[0].float()


def import_exllamav2() -> str | None:
    """None once exllamav2 is imported, else why not (one line)."""
    try:
        import exllamav2  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - its import JIT-builds CUDA code and fails in many ways
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return f"{type(exc).__name__}: {lines[-1] if lines else ''}".strip()
    return None


def free_vram() -> tuple[int, str] | None:
    """(free bytes, device name) of the first CUDA device, or None when torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(0)
    return int(free), str(torch.cuda.get_device_properties(0).name)
