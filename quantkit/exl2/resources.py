"""What each pipeline step needs: disk, system RAM and VRAM, from what exllamav2 0.3.2's converter holds.

Measurement (`conversion/measure.py`) keeps one fp16 hidden state per calibration row in system RAM, as
input and target (`rows x length x hidden x 2` bytes each), checkpoints them to
`hidden_states.safetensors` (plus a temp copy while swapping), and measures one module at a time:
`test_quant` (measure.py:101-123) keeps every quantized variant of each projection as an fp16 copy on the
CPU, 13-15 per projection (`qparams.py` tables: attention 14/14/15/14, MLP 13/13/14), ~4.7 GB for one
Llama-3-8B MLP layer. Quantization (`conversion/quantize.py:270-456`) holds three lists of states (input,
target, and the quantized module's output). On the GPU the module's fp16 weights, an fp32 Hessian per
linear input, and while one linear is quantized (`adaptivegptq.py` `quantize`, 462-490) its fp32 weights,
result and error (12 bytes per weight beside the fp16 weight); the lm_head is the largest such linear
(~14 bytes per weight: ~7 GB for Llama-3-8B's). compile.py then writes the shards into `-cf`.
Read from the code; no GPU has measured them yet.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantkit.model import Model
from quantkit.vram import CUDA_CONTEXT_BYTES, decoder_linears, decoder_weight_bytes, embeddings_ram_bytes, lm_head_bytes, norms_and_biases_bytes

#: Quantized variants measure.py tries per projection (qparams.py's reduced tables), at most.
MEASURE_VARIANTS = 15
#: fp32 working copies of the linear being quantized: weights, result, error (adaptivegptq.py quantize()).
GPTQ_BYTES_PER_WEIGHT = 12


class StepNeeds(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: str
    disk_bytes: int
    ram_bytes: int
    vram_bytes: int


def _states(model: Model, rows: int, length: int) -> int:
    return rows * length * model.shape.hidden * 2


def _groups(model: Model) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    lin = decoder_linears(model.shape, model.spec)
    return lin[:4], lin[4:]


def _module_vram(model: Model) -> int:
    """The largest module on the GPU while it is measured/quantized: its fp16 weights, an fp32 Hessian per
    linear input, and the fp32 working copies of its largest linear; or the lm_head, the biggest single
    step (exllamav2 #419): fp16 weight, fp32 Hessian, fp32 working copies."""
    def cost(group: list[tuple[int, int]]) -> int:
        weights = sum(i * o for i, o in group) * 2
        hessians = sum(i * i * 4 for i, _ in group)
        return weights + hessians + GPTQ_BYTES_PER_WEIGHT * max(i * o for i, o in group)
    head_weights = model.shape.hidden * model.shape.vocab
    head = head_weights * (2 + GPTQ_BYTES_PER_WEIGHT) + model.shape.hidden**2 * 4
    return max(*(cost(g) for g in _groups(model) if g), head)


def _variants_ram(model: Model) -> int:
    """measure.py's fp16 variants of every projection of the largest module, held on the CPU."""
    return max(sum(i * o for i, o in g) * 2 * MEASURE_VARIANTS for g in _groups(model) if g)


def _activations_vram(model: Model, length: int) -> int:
    return 2 * length * (model.shape.hidden + model.shape.intermediate) * 2 * 4


def measure_needs(model: Model, *, rows: int, length: int) -> StepNeeds:
    states = _states(model, rows, length)
    return StepNeeds(
        step="measure",
        disk_bytes=2 * states + rows * length * 8,  # hidden_states + its temp swap; cal_data int64
        ram_bytes=2 * states + _variants_ram(model) + embeddings_ram_bytes(model.shape),
        vram_bytes=_module_vram(model) + _activations_vram(model, length) + CUDA_CONTEXT_BYTES,
    )


def convert_needs(model: Model, *, bits: float, head_bits: int, rows: int, length: int) -> StepNeeds:
    states = _states(model, rows, length)
    quant = decoder_weight_bytes(model.shape, model.spec, bits) + lm_head_bytes(model.shape, head_bits)
    output = quant + norms_and_biases_bytes(model.shape, model.spec) + embeddings_ram_bytes(model.shape)
    return StepNeeds(
        step=f"convert {bits:g}",
        disk_bytes=2 * states + quant + output + rows * length * 8,  # states, out_tensor/, -cf shards, cal_data
        ram_bytes=3 * states + embeddings_ram_bytes(model.shape),  # quantize.py: input, target, output states
        vram_bytes=_module_vram(model) + _activations_vram(model, length) + CUDA_CONTEXT_BYTES,
    )


def adapt_needs(disk_bytes: int, *, shard_bytes: int) -> StepNeeds:
    """The adapter's working copy, on the CPU: the rewritten tensors on disk, and in RAM one new shard's
    worth of them at most (workcopy.py writes a shard once it holds `shard_bytes`)."""
    return StepNeeds(step="adapt", disk_bytes=disk_bytes, ram_bytes=min(disk_bytes, shard_bytes), vram_bytes=0)
