"""The VRAM estimator: pure functions of a model's shape, bits, context and cache mode.

Each term names the exllamav2 0.3.2 code it models. Units are bytes. The model: a converted EXL2 model
loaded on one GPU with `config.max_seq_len = context` and served by the dynamic generator, defaults
for everything else (`max_input_len` 2048, `max_batch_size` 1, `max_dq_size` 512 Mi elements,
`max_attention_size` 2048², flash-attn present). Token embeddings stay in system RAM.
"""

from __future__ import annotations

import math
from enum import Enum

from pydantic import BaseModel, ConfigDict

from quantkit.archs import ArchSpec
from quantkit.errors import InvalidBits, InvalidContext, InvalidHeadBits, UnknownCacheMode, UnknownLoader
from quantkit.model import Model, ModelShape

GiB = 1024**3
MiB = 1024**2

# exllamav2/config.py ExLlamaV2Config.__init__ defaults.
MAX_INPUT_LEN = 2048  # max_input_len: prompt chunk size
MAX_BATCH_SIZE = 1  # max_batch_size
MAX_DQ_SIZE = 512 * 1024**2  # max_dq_size, in elements
MAX_ATTENTION_SIZE = 2048**2  # max_attention_size

#: The CUDA context (driver, kernels of torch, exllamav2_ext and flash-attn, cuBLAS workspace) plus the
#: caching allocator's slack. exllamav2 models none of it. Typical CUDA 12 contexts on Ampere/Hopper are
#: 300-600 MiB; this is the upper side until a GPU measurement (benchmarks/gpu/vram.json) calibrates it.
CUDA_CONTEXT_BYTES = 600 * MiB

#: exllamav2/generator/dynamic.py: cache.max_seq_len must be a multiple of the 256-token page.
PAGE_SIZE = 256

#: exllamav2/conversion/qparams.py qparams_headoptions: the lm_head options `-hb` accepts.
HEAD_OPTIONS: dict[int, tuple[int, tuple[int, ...], tuple[float, ...]]] = {
    # head_bits: (group_size, bits, bits_prop); scale_bits is 4 for every option
    2: (32, (4, 2), (0.3, 0.7)),
    3: (32, (4, 3), (0.15, 0.85)),
    4: (32, (6, 4), (0.15, 0.85)),
    5: (128, (6, 5), (0.15, 0.85)),
    6: (128, (8, 6), (0.15, 0.85)),
    8: (128, (8,), (1.0,)),
}

#: convert_exl2.py warns "target bitrate {bits} will likely not be attainable" outside [2, 8].
MIN_BITS = 2.0
MAX_BITS = 8.0


class Loader(str, Enum):
    """How the model is put on the GPU; the loaders differ only in what they allocate while loading."""

    #: TabbyAPI's way on one GPU: model.load() (set_device_map, then each module's weights), the cache,
    #: then a prefill-only test forward of one `max_input_len` chunk (model.forward(preprocess_only=True)):
    #: no logits, so the load peaks no higher than serving does.
    TABBY = "tabby"
    #: ExLlamaV2.load_autosplit(cache): the examples' and the GPU proof's way. It holds two reserve tensors
    #: while loading and test-forwards (1, max_input_len) through every module, the lm_head included.
    AUTOSPLIT = "autosplit"


#: model.py load_autosplit_gen: `reserve_vram = [192 * 1024**2] + ...` for device 0 and
#: `minimum_reserve_vram = 256 * 1024**2`, both alive until every module is loaded.
AUTOSPLIT_RESERVE_BYTES = 192 * MiB + 256 * MiB


def parse_loader(text: str) -> Loader:
    try:
        return Loader(text.strip().lower())
    except ValueError:
        raise UnknownLoader(text, [m.value for m in Loader]) from None


class CacheMode(str, Enum):
    """exllamav2/cache.py classes. `k_bytes`/`v_bytes`: bytes per K or V element incl. Q-cache scales."""

    FP16 = "fp16"  # ExLlamaV2Cache
    FP8 = "fp8"  # ExLlamaV2Cache_8bit
    Q8 = "q8"  # ExLlamaV2Cache_Q8
    Q6 = "q6"  # ExLlamaV2Cache_Q6: 8-bit K, 4-bit V (fp16_to_q_kv_kernel<8, 4>)
    Q4 = "q4"  # ExLlamaV2Cache_Q4

    @property
    def exl2_class(self) -> str:
        return {"fp16": "ExLlamaV2Cache", "fp8": "ExLlamaV2Cache_8bit", "q8": "ExLlamaV2Cache_Q8",
                "q6": "ExLlamaV2Cache_Q6", "q4": "ExLlamaV2Cache_Q4"}[self.value]

    @property
    def element_bytes(self) -> tuple[float, float]:
        # Q caches: (B, S, Hkv, D//32) fp16 scales for K and for V = 2/32 bytes per element each.
        scale = 2 / 32
        return {
            "fp16": (2.0, 2.0),
            "fp8": (1.0, 1.0),
            "q8": (1.0 + scale, 1.0 + scale),
            "q6": (1.0 + scale, 0.5 + scale),
            "q4": (0.5 + scale, 0.5 + scale),
        }[self.value]

    @property
    def quantized(self) -> bool:
        return self is not CacheMode.FP16


COMPONENTS = (
    "decoder_weights",
    "norms_and_biases",
    "lm_head",
    "scratch",
    "rope_tables",
    "kv_cache",
    "kv_fp16_buffer",
    "activations",
    "attention_copies",
    "load_transient",
    "cuda_context",
)


class Estimate(BaseModel):
    """One cell of the plan: a bitrate, cache mode and context, with every component."""

    model_config = ConfigDict(frozen=True)

    bits: float
    head_bits: int
    cache: CacheMode
    context: int
    components: dict[str, int]
    embeddings_ram: int
    measured_weights: bool
    loader: Loader = Loader.TABBY
    flash_attn: bool = True

    @property
    def total(self) -> int:
        return sum(self.components.values())


# ---- validation -------------------------------------------------------------------------------------


def check_bits(bits: float) -> float:
    if not math.isfinite(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidBits(str(bits), f"exllamav2 targets {MIN_BITS:g} to {MAX_BITS:g} bits per weight")
    return float(bits)


def check_head_bits(head_bits: int) -> int:
    if head_bits not in HEAD_OPTIONS:
        raise InvalidHeadBits(str(head_bits))
    return head_bits


#: Contexts beyond this are refused: no model exllamav2 0.3.2 loads has a use for them, and a typo
#: (10^12) would otherwise be planned as hundreds of thousands of GiB.
MAX_CONTEXT = 10**7


def check_context(context: int) -> int:
    if context <= 0:
        raise InvalidContext(str(context), "must be a positive number of tokens")
    if context > MAX_CONTEXT:
        raise InvalidContext(str(context), f"is beyond {MAX_CONTEXT:,} tokens, more than any model exllamav2 loads can use")
    return context


def parse_cache(text: str) -> CacheMode:
    try:
        return CacheMode(text.strip().lower())
    except ValueError:
        raise UnknownCacheMode(text, [m.value for m in CacheMode]) from None


# ---- weights ----------------------------------------------------------------------------------------


def qparams_total_bits(rows: int, columns: int, group_size: int, bits: tuple[int, ...], props: tuple[float, ...], scale_bits: int = 4) -> int:
    """exllamav2/conversion/qparams.py QParams.total_bits: q_weight + q_scale_max + q_groups + q_scale + q_invperm."""
    groups = 0
    remaining = rows
    per_bits: list[int] = []
    for p in props:
        g = math.ceil(min(rows * p, remaining) / group_size)
        groups += g
        remaining -= g * group_size
        per_bits.append(g)
    total = 0
    tr = rows
    for g, b in zip(per_bits, bits):
        r = min(group_size * g, tr)
        tr -= r
        total += r * columns * b
    total += groups * 16 + groups * 32 + groups * columns * scale_bits + rows * 32
    return total


def lm_head_bytes(shape: ModelShape, head_bits: int) -> int:
    """The EXL2 lm_head, quantized with qparams_headoptions[head_bits] (rows = hidden, columns = vocab);
    tied-embedding models get a separate quantized lm_head too (compile.py)."""
    gs, bits, props = HEAD_OPTIONS[head_bits]
    return qparams_total_bits(shape.hidden, shape.vocab, gs, bits, props) // 8 + _group_map_bytes(shape.hidden)


def _group_map_bytes(rows: int) -> int:
    # linear.py / ext make_q_matrix: q_invperm (int32 on disk) becomes q_perm + q_invperm int16 (same bytes)
    # and a q_group_map of two int16 per row is built at load.
    return rows * 4


def decoder_linears(shape: ModelShape, spec: ArchSpec) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer of one decoder layer that EXL2 quantizes."""
    h, d = shape.hidden, shape.head_dim
    attn = [(h, shape.heads * d), (h, shape.kv_heads * d), (h, shape.kv_heads * d), (shape.heads * d, h)]
    per_mlp = [(h, shape.intermediate), (h, shape.intermediate), (shape.intermediate, h)]
    if spec.mlp == "plain":
        per_mlp = per_mlp[1:]
    mlp = per_mlp * (shape.experts or 1) if spec.moe else per_mlp
    return attn + mlp


def decoder_params(shape: ModelShape, spec: ArchSpec) -> int:
    """Weights the optimizer's budget covers (optimize.py: numel of q, k, v, o and every expert's MLP)."""
    return shape.layers * sum(i * o for i, o in decoder_linears(shape, spec))


def decoder_weight_bytes(shape: ModelShape, spec: ArchSpec, bits: float) -> int:
    """optimize.py fits `numel * bits` over the decoder: QParams bit counts include scales and perms."""
    rows = shape.layers * sum(i for i, _ in decoder_linears(shape, spec))
    return int(decoder_params(shape, spec) * bits / 8) + _group_map_bytes(rows)


def norms_and_biases_bytes(shape: ModelShape, spec: ArchSpec) -> int:
    """fp16 tensors EXL2 keeps unquantized on the GPU: norms (LayerNorm adds a bias), attention/MLP biases,
    MoE routers, the final norm (rmsnorm.py / layernorm.py / moe_mlp.py `gate`)."""
    per_norm = shape.hidden * (2 if spec.norm == "layernorm" else 1)
    norms = 2 if not spec.parallel_decoder else 1
    if spec.alternating_swa:  # Gemma2/3 and Cohere2 add post-attention/post-MLP norms
        norms = 4
    per_layer = norms * per_norm
    if spec.moe and shape.experts:
        per_layer += shape.hidden * shape.experts
    if spec.norm == "layernorm" and spec.mlp == "plain":  # GPT-2 style: biases everywhere
        per_layer += sum(o for _, o in decoder_linears(shape, spec))
    return 2 * (shape.layers * per_layer + per_norm)


def header_weight_bytes(model: Model) -> tuple[int, int, int]:
    """(decoder, lm_head, other) bytes from the safetensors headers of a converted folder.

    model.py `weight_footprint()` sums `data_offsets[1] - data_offsets[0]` per tensor (stloader.py
    `STFile.measure`); the token embedding goes to system RAM and is excluded.
    """
    decoder = head = other = 0
    rows = 0
    for name, t in model.tensors.items():
        if name.endswith("embed_tokens.weight") or name.startswith(("vision_tower.", "multi_modal_projector.", "visual.")):
            continue
        if name.startswith("lm_head."):
            head += t.nbytes
        elif ".layers." in name:
            decoder += t.nbytes
            if name.endswith(".q_invperm"):
                rows += t.shape[0]
        else:
            other += t.nbytes
    return decoder + _group_map_bytes(rows), head, other


def achieved_bits(model: Model) -> float:
    """Bits per decoder weight of a converted model from its headers (every q_* tensor over the weights
    the optimizer budgets), for a converted model whose config.json does not say its bitrate."""
    raw = sum(t.nbytes for n, t in model.tensors.items() if ".layers." in n and not n.endswith("embed_tokens.weight"))
    params = decoder_params(model.shape, model.spec)
    bits = raw * 8 / params if params else MAX_BITS
    return round(min(max(bits, MIN_BITS), MAX_BITS), 2)


# ---- fixed buffers ----------------------------------------------------------------------------------


def _dq(i: int, o: int) -> int:
    # linear.py temp_dq_size: 2 * min(in * out, config.max_dq_size)
    return 2 * min(i * o, MAX_DQ_SIZE)


def scratch_bytes(shape: ModelShape, spec: ArchSpec) -> dict[str, int]:
    """Per-module `scratch_space_fixed()`; model.py allocates the max over modules once per device."""
    lin, b, h, d = MAX_INPUT_LEN, MAX_BATCH_SIZE, shape.hidden, shape.head_dim
    linears = decoder_linears(shape, spec)
    attn_lin, mlp_lin = linears[:4], linears[4:]
    # attn.py: temp_state_size + temp_dq_size
    attn = lin * b * max(shape.heads * d, h) * 2 + 128 + max(_dq(i, o) for i, o in attn_lin)
    if spec.moe and shape.experts:
        # moe_mlp.py: state + gathered state + a + b + router logits + dq
        i_ = shape.intermediate
        mlp = (lin * b * h * 2 + 128) * 2 + (lin * b * i_ * 2 + 128) * 2 + lin * b * shape.experts * 2 + 128
        mlp += max(_dq(i, o) for i, o in mlp_lin)
    else:
        # mlp.py: temp_state_size(out=h) + temp_a + temp_b (max(in, interm, out)) + dq
        wide = max(h, shape.intermediate)
        mlp = lin * b * h * 2 + 128 + 2 * (lin * b * wide * 2 + 128) + max(_dq(i, o) for i, o in mlp_lin)
    # linear.py (lm_head, is_sub_module=False): temp_dq_size only, capped by max_dq_size
    head = _dq(h, shape.vocab)
    if spec.parallel_decoder:  # parallel_decoder.py: max(attn, mlp) for the one fused module
        attn = mlp = max(attn, mlp)
    return {"attention": attn, "mlp": mlp, "lm_head": head}


def rope_bytes(shape: ModelShape, spec: ArchSpec, context: int) -> int:
    """device.py prepare_sincos: fp16 sin and cos of (max_seq_len, rotary dim); one more pair for an
    alternate theta (Gemma3's sliding layers). A 1-element dummy when there is no RoPE."""
    if spec.rope == "none":
        return 4
    pairs = 2 if spec.name == "Gemma3ForConditionalGeneration" else 1
    return pairs * 2 * 2 * context * shape.rotary_dim


def cache_seq_len(shape: ModelShape, cache: CacheMode, context: int) -> int:
    """The dynamic generator needs a multiple of the 256-token page; Q caches (cache.py) also round up
    to `q_block`, the smallest k with (Hkv * D * k) % 512 == 0."""
    s = -(-context // PAGE_SIZE) * PAGE_SIZE
    if cache.quantized:
        kv_dim = shape.kv_heads * shape.head_dim
        q_block = next(k for k in range(1, 513) if (kv_dim * k) % 512 == 0)
        s = -(-s // q_block) * q_block
    return s


def kv_cache_bytes(shape: ModelShape, cache: CacheMode, context: int) -> tuple[int, int]:
    """(cache, fp16 buffer): cache.py tensors (B, S, Hkv, D / weights_per_element) for K and V per layer;
    quantized caches add one full-length fp16 K and V pair per device (`temp_tensors`, shape_basic)."""
    s = cache_seq_len(shape, cache, context)
    per_pos = shape.kv_heads * shape.head_dim
    kb, vb = cache.element_bytes
    layers = int(shape.layers * s * per_pos * (kb + vb))
    temp = 2 * 2 * MAX_BATCH_SIZE * s * per_pos if cache.quantized else 0
    return layers, temp


def activation_bytes(shape: ModelShape, context: int) -> int:
    """Transient tensors of the largest forward, a full `max_input_len` prompt chunk, as torch allocates them
    beside the fixed scratch: the hidden state x (model.py forward_chunk), q, k and v
    (attn.py forward_paged: `torch.empty((batch_size, q_len, num_heads, head_dim))`; forward() likewise)
    and the attention output, plus one row of fp16 logits for the sampled token (linear.py forward:
    `torch.empty((rows, out_features), dtype=torch.half)`).

    flash-attn itself allocates only its (heads, q) fp32 softmax statistics. `temp_attn_size()` is not
    counted: it is a budget `set_device_map` reserves on paper, never a tensor."""
    q = min(MAX_INPUT_LEN, context)
    x = q * shape.hidden * 2
    qkv = q * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * 2
    out = q * shape.heads * shape.head_dim * 2
    lse = q * shape.heads * 4
    logits = shape.vocab * 2
    return x + qkv + out + lse + logits


def attention_copy_bytes(shape: ModelShape, cache: CacheMode, context: int, *, flash_attn: bool) -> int:
    """Without flash-attn the dynamic generator runs unpaged (generator/dynamic.py: paged mode asserts
    flash-attn) and attention goes through attn.py `_attn_torch`, whose `repeat_kv` materialises K and V
    for every query head over the whole cached sequence: 2 x (B, Hq, S, D) fp16, one layer at a time.
    With Hq == Hkv `repeat_kv` returns its input and nothing is copied. torch's SDPA (lower-right causal
    bias) is not given a dense mask, so no (q, k) score matrix is added."""
    if flash_attn or shape.heads == shape.kv_heads:
        return 0
    s = cache_seq_len(shape, cache, context)
    return 2 * MAX_BATCH_SIZE * shape.heads * s * shape.head_dim * 2


def load_transient_bytes(shape: ModelShape, context: int, *, loader: Loader) -> int:
    """What loading holds beyond serving. TabbyAPI's load() + prefill-only test forward: nothing (its
    forward stops before the lm_head). load_autosplit: the 192 + 256 MiB reserve tensors (model.py
    load_autosplit_gen) and the lm_head's test-forward logits, (1, max_input_len, vocab) fp16
    (`last_id_only=False`; linear.py allocates the output), where max_input_len is first capped at
    max_seq_len."""
    if loader is Loader.TABBY:
        return 0
    rows = min(MAX_INPUT_LEN, context)
    return AUTOSPLIT_RESERVE_BYTES + rows * shape.vocab * 2


def embeddings_ram_bytes(shape: ModelShape) -> int:
    """model.py load: module 0 (the embedding) stays on the CPU (`set_device_idx(-1)`), fp16."""
    return shape.vocab * shape.hidden * 2


# ---- the estimate -----------------------------------------------------------------------------------


def estimate(model: Model, *, bits: float, head_bits: int, context: int, cache: CacheMode,
             loader: Loader = Loader.TABBY, flash_attn: bool = True) -> Estimate:
    """Peak VRAM for one (bits, head bits, context, cache) cell under a loader, with or without flash-attn.

    A converted EXL2 model is sized from its real tensor sizes when `bits` is its own bitrate
    (`Model.exl2_bits`); any other bitrate, or a source model, from `bits x parameters`."""
    check_bits(bits)
    check_head_bits(head_bits)
    check_context(context)
    shape, spec = model.shape, model.spec
    measured = model.headers_describe(bits)
    if measured:
        decoder, head, other = header_weight_bytes(model)
    else:
        decoder = decoder_weight_bytes(shape, spec, bits)
        head = lm_head_bytes(shape, head_bits)
        other = norms_and_biases_bytes(shape, spec)
    cache_b, temp_b = kv_cache_bytes(shape, cache, context)
    components = {
        "decoder_weights": decoder,
        "norms_and_biases": other,
        "lm_head": head,
        "scratch": max(scratch_bytes(shape, spec).values()),
        "rope_tables": rope_bytes(shape, spec, context),
        "kv_cache": cache_b,
        "kv_fp16_buffer": temp_b,
        "activations": activation_bytes(shape, context),
        "attention_copies": attention_copy_bytes(shape, cache, context, flash_attn=flash_attn),
        "load_transient": load_transient_bytes(shape, context, loader=loader),
        "cuda_context": CUDA_CONTEXT_BYTES,
    }
    assert tuple(components) == COMPONENTS
    return Estimate(
        bits=bits, head_bits=head_bits, cache=cache, context=context, components=components,
        embeddings_ram=embeddings_ram_bytes(shape), measured_weights=measured, loader=loader, flash_attn=flash_attn,
    )
