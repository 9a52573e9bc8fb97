"""A pure-PyTorch stand-in for exllamav2 0.3.2's compiled extension, for tests on a CPU.

exllamav2's `ext.py` does `import exllamav2_ext` before it tries to JIT-build its CUDA code, so this module
on `sys.path` replaces the extension without touching exllamav2. It implements what quantkit's paths call:
measurement, quantisation and compilation (`exllamav2.conversion`), and the load + forward of an EXL2 or an
unquantized folder without a cache or with an FP16 cache, for the Llama / Mistral / Qwen2 paths and the
adapters' targets (Orion: LayerNorm; Starcoder2: LayerNorm, a non-gated GELU MLP, biases). Every other
name raises NotImplementedError naming itself, so a new code path shows what it needs.

Each function follows the CUDA kernel it replaces (`exllamav2/exllamav2_ext/cuda/*.cu`, read from the
0.3.2 wheel); the packed layouts are the kernels' (a continuous little-endian bit stream down each column
for `pack_columns`, eight 4-bit scales per int32 for `pack_rows_4`). Bit-exactness against the GPU is
unproven: here the packer and the dequantizer agree with each other.
"""

from __future__ import annotations

import collections
import math
import random
from typing import Any

import torch

#: name -> calls in this process (tests read it to see which kernels a path used).
CALLS: collections.Counter[str] = collections.Counter()


def _count(name: str) -> None:
    CALLS[name] += 1


def _given(t: Any) -> bool:
    """exllamav2 passes `none_tensor` (a meta tensor) for an absent optional argument."""
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*_a: Any, **_k: Any) -> Any:
        raise NotImplementedError(f"exllamav2_ext.{name} is not implemented by the CPU stand-in (tests/exl2_cpu)")

    missing.__name__ = name
    return missing


# ---- norms, rope, softcap --------------------------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _layer(x: torch.Tensor, w: torch.Tensor, b: Any, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float() if _given(b) else None, eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    _count("rms_norm")
    out.copy_(_rms(x, w, eps).to(out.dtype))


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: Any, out: torch.Tensor, eps: float) -> None:
    _count("layer_norm")
    out.copy_(_layer(x, w, b, eps).to(out.dtype))


def head_norm(x: torch.Tensor, w: torch.Tensor, b: Any, out: torch.Tensor, eps: float, rms: bool) -> None:
    _count("head_norm")
    y = _rms(x, w, eps) if rms else _layer(x, w, b, eps)
    out.copy_(y.to(out.dtype))


def rope_(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, past_len: int, num_heads: int, head_dim: int,
          offsets: Any, neox_style: bool) -> None:
    _count("rope_")
    # The kernel's position of row r is r // num_heads (x is (batch, q_len, heads, head_dim)).
    batch = x.shape[0]
    xv = x.view(batch, -1, num_heads, head_dim)
    rot = sin.shape[-1]
    s_tab = sin.reshape(-1, rot).float()
    c_tab = cos.reshape(-1, rot).float()
    q_len = xv.shape[1]
    base = torch.full((batch,), past_len, dtype=torch.int64)
    if _given(offsets):
        base = offsets.long().clamp(min=0) if past_len == -1 else base + offsets.long()
    idx = (base[:, None] + torch.arange(q_len)[None, :]).clamp(min=0)
    s, c = s_tab[idx][:, :, None, :], c_tab[idx][:, :, None, :]
    xr = xv[..., :rot].float()
    if neox_style:
        half = rot // 2
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    else:
        rotated = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    xv[..., :rot] = (xr * c + rotated * s).to(x.dtype)


def softcap_(x: torch.Tensor, scale: float) -> None:
    _count("softcap_")
    x.copy_((torch.tanh(x.float() / scale) * scale).to(x.dtype))


# ---- the safetensors reader ------------------------------------------------------------------------


def stloader_read(filename: str, offset: int, size: int, tensor: torch.Tensor) -> None:
    _count("stloader_read")
    with open(filename, "rb") as f:
        f.seek(offset)
        buf = bytearray(f.read(size))
    tensor.copy_(torch.frombuffer(buf, dtype=tensor.dtype).reshape(tensor.shape))


def safetensors_close_fb(*_a: Any) -> None:
    _count("safetensors_close_fb")  # nothing is kept open


def stfiles_free_pinned_buffer(*_a: Any) -> None:
    _count("stfiles_free_pinned_buffer")


# ---- the optimizer -----------------------------------------------------------------------------------
# ext_quant.cpp's sim_anneal: minimise sum(err ** norm) over one option per slot with total cost <=
# max_cost, by ~2e6 annealing steps per call. On the tiny models of the tests the slots' product is small
# (4 slots of 17-19 options, ~1e5 combinations), so the optimum the anneal converges to is computed
# exactly, in one vectorised pass. Larger problems run the same anneal with its outer loop capped.

EXACT_MAX = 4_000_000
ANNEAL_OUTER_CAP = 20


def _anneal_exact(slots: list[list[tuple[int, float]]], max_cost: int, norm: float) -> tuple[Any, ...]:
    cost = torch.zeros((), dtype=torch.int64)
    err = torch.zeros((), dtype=torch.float64)
    for s in slots:
        cost = cost[..., None] + torch.tensor([o[0] for o in s], dtype=torch.int64)
        err = err[..., None] + torch.tensor([o[1] for o in s], dtype=torch.float64).pow(norm)
    ok = cost <= max_cost
    if not bool(ok.any()):  # the anneal accepts no move into an over-budget state: it keeps its start
        idx = [0] * len(slots)
    else:
        flat = int(torch.where(ok, err, torch.full_like(err, math.inf)).flatten().argmin())
        idx = []
        for n in reversed([len(s) for s in slots]):
            flat, k = divmod(flat, n)
            idx.append(k)
        idx.reverse()
    sol = [slots[i][k] for i, k in enumerate(idx)]
    return sol, idx, float(sum(o[1] ** norm for o in sol)), int(sum(o[0] for o in sol)), max(o[1] for o in sol)


def sim_anneal(slots: list[list[tuple[int, float]]], max_cost: int, initial_temp: float, cooling_factor: float,
               min_temp: float, iterations: int, norm: float) -> tuple[Any, ...]:
    _count("sim_anneal")
    if math.prod(len(s) for s in slots) <= EXACT_MAX:
        return _anneal_exact(slots, max_cost, norm)
    rng = random.Random(0)
    n = len(slots)
    sol = [s[0] for s in slots]
    idx = [0] * n
    cost = sum(o[0] for o in sol)
    cur = sum(o[1] ** norm for o in sol)
    temp = initial_temp
    outer = min(int(math.log(min_temp / temp) / math.log(cooling_factor)), ANNEAL_OUTER_CAP)
    for _ in range(outer):
        for _ in range(iterations):
            i = rng.randrange(n)
            k = rng.randrange(len(slots[i]))
            new, old = slots[i][k], sol[i]
            dc, de = new[0] - old[0], new[1] ** norm - old[1] ** norm
            if cost + dc <= max_cost and (de < 0 or rng.random() < math.exp(-de / temp)):
                sol[i], idx[i] = new, k
                cur += de
                cost += dc
        temp *= cooling_factor
    return sol, idx, cur, cost, max(o[1] for o in sol)


# ---- GPTQ ----------------------------------------------------------------------------------------------


def quantize_err(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, qzero: float, maxq: float, err_norm: float,
                 min_p: float, max_p: float, p_grid: int) -> None:
    """quantize.cu: the error of every grid point p of the scale, summed per column into 128 buckets."""
    _count("quantize_err")
    cols = x.shape[1]
    pi = torch.arange(p_grid + 1, dtype=torch.float32) / p_grid
    s = scale[None, :] * (min_p * (1 - pi) + max_p * pi)[:, None]  # (grid, cols)
    xq = torch.clamp(torch.round(x[None] / s[:, None, :]), -qzero, maxq - qzero) * s[:, None, :]
    colsum = (xq - x[None]).abs().pow(err_norm).sum(1)  # (grid, cols)
    pad = (-cols) % 128
    out.zero_()
    out += torch.nn.functional.pad(colsum, (0, pad)).view(p_grid + 1, -1, 128).sum(1)


def _q_rows(w: torch.Tensor, s: torch.Tensor, qzero: float, maxq: float) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / s) + qzero, 0, maxq)
    dq = ((q.half() - torch.tensor(qzero).half()) * s.half()).float()
    return q, dq


def quantize_range(quant: torch.Tensor, scale: torch.Tensor, out_q: torch.Tensor, qzero: float, maxq: float,
                   hessian_inv: torch.Tensor, weights: torch.Tensor, error: torch.Tensor, a: int, b: int) -> None:
    """GPTQ over rows a..b: each row is quantized, its error spread over the rows after it in the block
    (sequential by nature: one vector op per row), then over every later row with one GEMM."""
    _count("quantize_range")
    given = _given(out_q)
    for c in range(a, b):
        q, dq = _q_rows(weights[c], scale, qzero, maxq)
        if given:
            out_q[c] = q.to(torch.int16)
        quant[c] = dq
        error[c] = (weights[c] - dq) / hessian_inv[c, c]
        weights[c + 1:b] -= hessian_inv[c, c + 1:b, None] * error[c][None, :]
    weights[b:].addmm_(hessian_inv[a:b, b:].T, error[a:b], beta=1.0, alpha=-1.0)


def quantize_range_inplace(weights: torch.Tensor, scale: torch.Tensor, out_q: torch.Tensor, qzero: float, maxq: float,
                           a: int, b: int) -> None:
    _count("quantize_range_inplace")
    q, dq = _q_rows(weights[a:b], scale, qzero, maxq)
    if _given(out_q):
        out_q[a:b] = q.to(torch.int16)
    weights[a:b] = dq


# ---- packing -------------------------------------------------------------------------------------------

_SHIFT4 = torch.arange(8, dtype=torch.int64) * 4


def pack_rows_4(inp: torch.Tensor, out: torch.Tensor) -> None:
    """pack_tensor.cu: eight scales (stored minus one) per int32, lowest nibble first."""
    _count("pack_rows_4")
    x = (inp.to(torch.int64) - 1).view(inp.shape[0], -1, 8)
    out.copy_(((x << _SHIFT4).sum(-1) & 0xFFFFFFFF).to(torch.uint32).view(torch.int32))


def _bit_positions(rows: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(rows, dtype=torch.int64) * bits
    return pos // 32, pos % 32


def pack_columns(inp: torch.Tensor, out: torch.Tensor, bits: int) -> None:
    """pack_tensor.cu: down each column, row r occupies bits r*bits .. r*bits+bits-1 of a little-endian
    stream of 32-bit words (3-, 5- and 6-bit values straddle words)."""
    _count("pack_columns")
    rows, cols = inp.shape
    x = inp.to(torch.int64) & ((1 << bits) - 1)
    word, shift = _bit_positions(rows, bits)
    words = torch.zeros((out.shape[0] + 1, cols), dtype=torch.int64)
    words.index_add_(0, word, (x << shift[:, None]) & 0xFFFFFFFF)
    spill = shift + bits > 32
    if bool(spill.any()):
        words.index_add_(0, word[spill] + 1, x[spill] >> (32 - shift[spill])[:, None])
    out.copy_(words[: out.shape[0]].to(torch.uint32).view(torch.int32))


def _unpack_columns(packed: torch.Tensor, rows: int, bits: int) -> torch.Tensor:
    p = packed.view(torch.uint32).to(torch.int64)
    p = torch.cat([p, torch.zeros_like(p[:1])])
    word, shift = _bit_positions(rows, bits)
    v = (p[word] >> shift[:, None]) | (p[word + 1] << (32 - shift)[:, None])
    return v & ((1 << bits) - 1)


# ---- the Q matrix: a reference dequantizer of the on-disk format ------------------------------------


class QMatrix:
    """What make_q_matrix keeps: the EXL2 tensors, dequantized once to fp16 (in x out, row order of the input)."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.t = tensors
        self._w: torch.Tensor | None = None
        self.bias = tensors["bias"]

    def weight(self, in_features: int) -> torch.Tensor:
        if self._w is None or self._w.shape[0] != in_features:
            self._w = _dequant(self.t, in_features)
        return self._w


def make_group_map(q_groups: torch.Tensor, num_qrows: int) -> torch.Tensor:
    _count("make_group_map")
    return torch.zeros((1,), dtype=torch.short)


def make_q_matrix(q_weight: torch.Tensor, q_perm: torch.Tensor, q_invperm: torch.Tensor, q_scale: torch.Tensor,
                  q_scale_max: torch.Tensor, q_groups: torch.Tensor, q_group_map: torch.Tensor, gptq_qzeros: torch.Tensor,
                  gptq_scales: torch.Tensor, gptq_g_idx: torch.Tensor, bias: torch.Tensor, temp_dq: torch.Tensor,
                  max_dq_rows: int) -> QMatrix:
    _count("make_q_matrix")
    if _given(gptq_qzeros):
        raise NotImplementedError("exllamav2_ext.make_q_matrix: GPTQ matrices are not implemented by the CPU stand-in")
    return QMatrix({"q_weight": q_weight, "q_invperm": q_invperm, "q_scale": q_scale, "q_scale_max": q_scale_max,
                    "q_groups": q_groups, "bias": bias if _given(bias) else None})


def free_q_matrix(_h: QMatrix) -> None:
    _count("free_q_matrix")


def _dequant(t: dict[str, Any], in_features: int) -> torch.Tensor:
    qs = t["q_scale"].view(torch.uint32).to(torch.int64)
    cols = t["q_weight"].shape[1]
    qscale = (((qs[:, :, None] >> _SHIFT4) & 15) + 1).reshape(qs.shape[0], -1)[:, :cols].float()
    groups = t["q_groups"].tolist()
    ng = len(groups) // 2
    out = torch.empty((in_features, cols), dtype=torch.float32)
    row = 0
    qrows_total = t["q_weight"].shape[0]
    for g in range(ng):
        bits, qrow = groups[2 * g], groups[2 * g + 1]
        qrow_end = groups[2 * g + 3] if g + 1 < ng else qrows_total
        nrows = min((qrow_end - qrow) * 32 // bits, in_features - row)
        q = _unpack_columns(t["q_weight"][qrow:qrow_end], nrows, bits).float()
        scale = (qscale[g] * qscale[g]).half().float() * t["q_scale_max"][g].float()  # q_scale_max holds the 1/256
        out[row:row + nrows] = (q - (1 << (bits - 1))) * scale
        row += nrows
    inv = t["q_invperm"]
    if not _given(inv):  # loaded with unmap: the input is already in the stored (activation) order
        return out.half()
    return out[inv.long()].half()


def reconstruct(h: QMatrix, out: torch.Tensor) -> None:
    _count("reconstruct")
    out.copy_(h.weight(out.shape[0]))


def _mm(x: torch.Tensor, h: QMatrix) -> torch.Tensor:
    """fp16 in, fp32 accumulate (as the CUDA GEMM), bias added, fp32 out."""
    r = x.float() @ h.weight(x.shape[-1]).float()
    if h.bias is not None:
        r += h.bias.float()
    return r


def gemm_half_q_half(a: torch.Tensor, h: QMatrix, c: torch.Tensor, force_cuda: bool) -> None:
    _count("gemm_half_q_half")
    c.copy_(_mm(a, h).to(c.dtype))


# ---- fused attention and MLP of an EXL2 model ------------------------------------------------------


class _Handle:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _pre_norm(h: _Handle, x: torch.Tensor) -> torch.Tensor:
    if not _given(h.norm_weight):
        return x.half()
    y = _rms(x, h.norm_weight, h.eps) if h.is_rms else _layer(x, h.norm_weight, h.norm_bias, h.eps)
    return y.half()


def _unsupported(what: str, **given: Any) -> None:
    for name, t in given.items():
        if _given(t) or (isinstance(t, list) and t):
            raise NotImplementedError(f"exllamav2_ext.{what}: {name} is not implemented by the CPU stand-in")


def make_q_attn(norm_weight: torch.Tensor, norm_bias: torch.Tensor, is_rms: bool, headnorm_rms: bool, eps: float,
                q: QMatrix, k: QMatrix, v: QMatrix, o: QMatrix, temp_state: torch.Tensor, temp_dq: torch.Tensor,
                max_rows: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                has_residual: bool, rope_style: int, rot_dim: int, q_norm: torch.Tensor, k_norm: torch.Tensor,
                post_norm_weight: torch.Tensor, post_norm_bias: torch.Tensor, residual_fp32: bool,
                use_graphs: bool) -> _Handle:
    _count("make_q_attn")
    _unsupported("make_q_attn", q_norm=q_norm, k_norm=k_norm, post_norm_weight=post_norm_weight)
    return _Handle(norm_weight=norm_weight, norm_bias=norm_bias, is_rms=is_rms, eps=eps, q=q, k=k, v=v, o=o,
                   num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, has_residual=has_residual,
                   rope_style=rope_style)


def free_q_attn(_h: _Handle) -> None:
    _count("free_q_attn")


def q_attn_forward_1(h: _Handle, x: torch.Tensor, batch_size: int, q_len: int, past_len: int, past_lens: torch.Tensor,
                     q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                     loras: list[Any], lora_temp: torch.Tensor) -> None:
    _count("q_attn_forward_1")
    _unsupported("q_attn_forward_1", loras=loras)
    n = _pre_norm(h, x)
    q = _mm(n, h.q).half().view(batch_size, q_len, h.num_heads, h.head_dim)
    k = _mm(n, h.k).half().view(batch_size, q_len, h.num_kv_heads, h.head_dim)
    v = _mm(n, h.v).half()
    if h.rope_style != 0:  # RopeStyle.NONE
        neox = h.rope_style == 2  # RopeStyle.NEOX
        offsets = past_lens if _given(past_lens) else None
        rope_(q, sin, cos, past_len, h.num_heads, h.head_dim, offsets, neox)
        rope_(k, sin, cos, past_len, h.num_kv_heads, h.head_dim, offsets, neox)
        CALLS["rope_"] -= 2  # fused: not a call from exllamav2
    q_out.copy_(q.view(q_out.shape))
    k_out.copy_(k.view(k_out.shape))
    v_out.copy_(v.view(v_out.shape))


def q_attn_forward_2(h: _Handle, x: torch.Tensor, attn_output: torch.Tensor, batch_size: int, q_len: int,
                     loras: list[Any], lora_temp: torch.Tensor) -> None:
    _count("q_attn_forward_2")
    _unsupported("q_attn_forward_2", loras=loras)
    o = _mm(attn_output.view(batch_size, q_len, -1).half(), h.o).view(x.shape)
    x.copy_(((x.float() + o) if h.has_residual else o).to(x.dtype))


def make_q_mlp(norm_weight: torch.Tensor, norm_bias: torch.Tensor, is_rms: bool, eps: float, gate: Any, up: QMatrix,
               down: QMatrix, temp_state: torch.Tensor, temp_a: torch.Tensor, temp_b: torch.Tensor, temp_dq: torch.Tensor,
               max_rows: int, act_gelu: bool, has_residual: bool, post_norm_weight: torch.Tensor,
               post_norm_bias: torch.Tensor, residual_fp32: bool, use_graphs: bool) -> _Handle:
    _count("make_q_mlp")
    _unsupported("make_q_mlp", post_norm_weight=post_norm_weight)
    return _Handle(norm_weight=norm_weight, norm_bias=norm_bias, is_rms=is_rms, eps=eps,
                   gate=gate if isinstance(gate, QMatrix) else None, up=up, down=down, act_gelu=act_gelu,
                   has_residual=has_residual)


def free_q_mlp(_h: _Handle) -> None:
    _count("free_q_mlp")


def q_mlp_forward_(h: _Handle, x: torch.Tensor, loras: list[Any], lora_temp: torch.Tensor) -> None:
    _count("q_mlp_forward_")
    _unsupported("q_mlp_forward_", loras=loras)
    n = _pre_norm(h, x)
    # q_mlp_activation.cuh: gelu is the tanh approximation, computed on fp16 inputs
    act = (lambda t: torch.nn.functional.gelu(t, approximate="tanh")) if h.act_gelu else torch.nn.functional.silu
    up = _mm(n, h.up).half().float()
    a = act(_mm(n, h.gate).half().float()) * up if h.gate is not None else act(up)
    d = _mm(a.half(), h.down).view(x.shape)
    x.copy_(((x.float() + d) if h.has_residual else d).to(x.dtype))


def tensor_remap(tensor: torch.Tensor, index: torch.Tensor) -> None:
    _count("tensor_remap")
    tensor.copy_(tensor[:, index.long()].clone())


def tensor_remap_4bit(tensor: torch.Tensor, index: torch.Tensor) -> None:
    _count("tensor_remap_4bit")
    t = tensor.view(torch.uint32).to(torch.int64)
    nib = ((t[:, :, None] >> _SHIFT4) & 15).reshape(t.shape[0], -1)[:, index.long()]
    packed = (nib.view(t.shape[0], -1, 8) << _SHIFT4).sum(-1) & 0xFFFFFFFF
    tensor.copy_(packed.to(torch.uint32).view(torch.int32))
