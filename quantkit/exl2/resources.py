"""What each pipeline step needs: disk, system RAM and VRAM. Estimates from exllamav2 0.3.2's code paths.

Measurement (measure.py) keeps one fp16 hidden state per calibration row in system RAM, as input and
target (`rows x length x hidden x 2` bytes each), checkpoints them to `hidden_states.safetensors` (plus a
temp copy while swapping), and loads one module at a time on the GPU in fp16 with a GPTQ Hessian
(`in x in` fp32) per linear and the quantized variants of that module. Quantization (quantize.py) does
the same over the quant-pass rows and writes each quantized module to `out_tensor/`, then compile.py
writes the shards again into `-cf`. These are estimates, not measurements: no GPU has checked them yet.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantkit.model import Model
from quantkit.vram import CUDA_CONTEXT_BYTES, decoder_linears, decoder_weight_bytes, embeddings_ram_bytes, lm_head_bytes, norms_and_biases_bytes



class StepNeeds(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: str
    disk_bytes: int
    ram_bytes: int
    vram_bytes: int


def _states(model: Model, rows: int, length: int) -> int:
    return rows * length * model.shape.hidden * 2


def _module_vram(model: Model) -> int:
    """The largest module on the GPU while it is measured/quantized: fp16 weights, an fp32 Hessian per
    linear input, the quantized copy, plus the fp16 lm_head (the biggest single step, exllamav2 #419)."""
    lin = decoder_linears(model.shape, model.spec)
    attn, mlp = lin[:4], lin[4:]
    def cost(group: list[tuple[int, int]]) -> int:
        weights = sum(i * o for i, o in group) * 2
        hessians = sum(i * i * 4 for i, _ in group)
        return 2 * weights + hessians
    head = model.shape.hidden * model.shape.vocab * 2 * 2 + model.shape.hidden**2 * 4
    return max(cost(attn), cost(mlp), head)


def measure_needs(model: Model, *, rows: int, length: int) -> StepNeeds:
    states = _states(model, rows, length)
    return StepNeeds(
        step="measure",
        disk_bytes=2 * states + rows * length * 8,  # hidden_states + its temp swap; cal_data int64
        ram_bytes=2 * states + embeddings_ram_bytes(model.shape),
        vram_bytes=_module_vram(model) + 2 * length * (model.shape.hidden + model.shape.intermediate) * 2 * 4 + CUDA_CONTEXT_BYTES,
    )


def convert_needs(model: Model, *, bits: float, head_bits: int, rows: int, length: int) -> StepNeeds:
    states = _states(model, rows, length)
    quant = decoder_weight_bytes(model.shape, model.spec, bits) + lm_head_bytes(model.shape, head_bits)
    output = quant + norms_and_biases_bytes(model.shape, model.spec) + embeddings_ram_bytes(model.shape)
    return StepNeeds(
        step=f"convert {bits:g}",
        disk_bytes=2 * states + quant + output + rows * length * 8,  # states, out_tensor/, -cf shards, cal_data
        ram_bytes=2 * states + embeddings_ram_bytes(model.shape),
        vram_bytes=_module_vram(model) + 2 * length * (model.shape.hidden + model.shape.intermediate) * 2 * 4 + CUDA_CONTEXT_BYTES,
    )


def adapt_needs(disk_bytes: int, *, shard_bytes: int) -> StepNeeds:
    """The adapter's working copy, on the CPU: the rewritten tensors on disk, and in RAM one new
    shard's worth of them at most (workcopy.py writes a shard once it holds `shard_bytes`)."""
    return StepNeeds(step="adapt", disk_bytes=disk_bytes, ram_bytes=min(disk_bytes, shard_bytes), vram_bytes=0)
