"""GPT-NeoX (sequential residual, e.g. RedPajama-INCITE-3B) -> exllamav2's StarCoder2.

Why StarCoder2: exllamav2 0.3.2 `architecture.py` builds Starcoder2ForCausalLM with LayerNorm (with bias),
Llama-named q/k/v/o projections with bias on all four (`attention_bias_qkv`, `attention_bias_o`), a
plain (non-gated) MLP `mlp.c_fc` -> GELU -> `mlp.c_proj` with bias (`mlp_bias`), NeoX RoPE, the LayerNorm
epsilon from `layer_norm_epsilon`, and `lm_head` with `model.embed_tokens` as its fallback. A GPT-NeoX
layer with `use_parallel_residual = false` is that block:

    x = x + dense(attn(rope(q), rope(k), v)),  q, k, v = split(query_key_value(input_layernorm(x)))
    x = x + dense_4h_to_h(gelu(dense_h_to_4h(post_attention_layernorm(x))))

Rewrites: `gpt_neox.*` -> `model.*`, `embed_in` -> `embed_tokens`, `final_layer_norm` -> `norm`,
`embed_out` (or transformers 5's `lm_head`) -> `lm_head`, `attention.dense` -> `self_attn.o_proj`,
`dense_h_to_4h`/`dense_4h_to_h` -> `mlp.c_fc`/`mlp.c_proj`, and the fused `query_key_value` split. Its
rows are per head, interleaved: transformers views the output as [heads, 3 * head_dim] and chunks the
last axis into q, k, v, so rows [h*3d, h*3d+d) are head h's q, the next d its k, the next d its v.
Rotary covers `int(head_dim * rotary_pct)` leading dims, NeoX halves, as exllamav2's kernel does for any
`partial_rotary_factor` (the same path the StableLM adapter relies on), so partial rotary maps too.

GELU, the one inexact step: GPT-NeoX's `hidden_act = "gelu"` is transformers' GELUActivation, the exact
erf form 0.5x(1 + erf(x/sqrt 2)). exllamav2's "gelu" is the tanh approximation 0.5x(1 + tanh(sqrt(2/pi)
(x + 0.044715x^3))) in its CUDA kernel (q_mlp_activation.cuh) and torch paths (mlp.py
`F.gelu(..., approximate="tanh")`). The two differ by at most 4.7e-4 (at |x| ~ 2.70; float64 over
[-20, 20]), under a quarter of fp16's spacing (1.95e-3) at that magnitude, so in exllamav2's fp16
arithmetic it is mostly lost in rounding. Its logit effect on the tiny CPU models is in
benchmarks/cpu/adapters.json. `gelu_new`, `gelu_fast` and `gelu_pytorch_tanh` are the tanh form: exact.

Refused by name: `use_parallel_residual = true` (x + attn(ln1(x)) + mlp(ln2(x)): two norms feeding
parallel branches; exllamav2's only parallel block, Cohere's, has one norm and GPT-J RoPE), any other
activation, scaled RoPE.
"""

from __future__ import annotations

from typing import Any

from quantkit.archs.adapters import entry
from quantkit.archs.adapters.base import (
    CONFIG_KEY,
    Adapter,
    AdapterPlan,
    Out,
    TensorInfo,
    check_rotary_dim,
    expect_shape,
    expect_tensors,
    need_int,
    rope_params,
)
from quantkit.errors import AdapterCheckpointMismatch, AdapterRefused
from quantkit.hfconfig import MISSING, lookup

# transformers 5 GPTNeoXConfig defaults, used when config.json omits a key.
DEFAULT_EPS = 1e-5
DEFAULT_ROTARY_FRACTION = 0.25
DEFAULT_PARALLEL = True
DEFAULT_ATTENTION_BIAS = True

#: hidden_act -> (exact on exllamav2's tanh GELU?, what the source computes)
GELU_FORMS: dict[str, tuple[bool, str]] = {
    "gelu": (False, "exact erf GELU"),
    "gelu_new": (True, "tanh-approximated GELU"),
    "gelu_fast": (True, "tanh-approximated GELU"),
    "gelu_pytorch_tanh": (True, "tanh-approximated GELU"),
}
GELU_MAX_ABS_DIFF = 4.7e-4

#: Buffers old checkpoints saved beside the weights (causal mask, rotary inv_freq): no weights.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")


def split_rows(heads: int, head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Row indices of q, k and v in the fused [heads, 3, head_dim] query_key_value."""
    q = tuple(h * 3 * head_dim + j for h in range(heads) for j in range(head_dim))
    k = tuple(r + head_dim for r in q)
    v = tuple(r + 2 * head_dim for r in q)
    return q, k, v


class GPTNeoXAdapter(Adapter):
    name = "gpt_neox"
    sources = ("GPTNeoXForCausalLM",)

    def check(self, config: dict[str, Any]) -> AdapterPlan:
        arch = str(config["architectures"][0])
        row = entry(arch)
        assert row is not None and row.adapter == self.name

        if lookup(config, "use_parallel_residual", default=DEFAULT_PARALLEL):
            raise AdapterRefused(arch, "use_parallel_residual = true" + (" (the transformers default)" if "use_parallel_residual" not in config else ""),
                                 "the block is x + attn(ln1(x)) + mlp(ln2(x)); no exllamav2 architecture feeds parallel attention "
                                 "and MLP from two LayerNorms (Cohere's parallel block has one norm and GPT-J RoPE)")
        act = lookup(config, "hidden_act", default="gelu")
        if act not in GELU_FORMS:
            raise AdapterRefused(arch, f"hidden_act = {act!r}", "StarCoder2's MLP computes GELU (tanh form) only")
        act_exact, act_form = GELU_FORMS[act]

        hidden = need_int(config, arch, "hidden", "hidden_size")
        layers = need_int(config, arch, "layers", "num_hidden_layers")
        heads = need_int(config, arch, "heads", "num_attention_heads")
        intermediate = need_int(config, arch, "intermediate", "intermediate_size")
        vocab = need_int(config, arch, "vocab", "vocab_size")
        if hidden % heads:
            raise AdapterRefused(arch, "num_attention_heads", f"hidden {hidden} is not a multiple of {heads} heads")
        theta, fraction = rope_params(config, arch, theta_keys=("rotary_emb_base", "rope_theta"), fraction_keys=("rotary_pct", "partial_rotary_factor"),
                                      default_fraction=DEFAULT_ROTARY_FRACTION)
        check_rotary_dim(arch, hidden // heads, fraction)
        eps = float(lookup(config, "layer_norm_eps", default=DEFAULT_EPS))
        attention_bias = bool(lookup(config, "attention_bias", default=DEFAULT_ATTENTION_BIAS))

        out: dict[str, Any] = {
            "architectures": [row.target],
            "model_type": "starcoder2",
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            # exllamav2 reads StarCoder2's epsilon from `layer_norm_epsilon` (architecture.py keys["norm_eps"]);
            # transformers' Starcoder2Config calls it `norm_epsilon`: write both.
            "layer_norm_epsilon": eps,
            "norm_epsilon": eps,
            "hidden_act": "gelu_pytorch_tanh",  # what exllamav2 computes (see the module docstring)
            "rope_theta": theta,
            "partial_rotary_factor": fraction,
            "max_position_embeddings": lookup(config, "max_position_embeddings", default=2048),
            "vocab_size": vocab,
            "use_bias": True,
            # Written always: the planner's table defaults StarCoder2 to tied embeddings, GPT-NeoX is untied.
            "tie_word_embeddings": bool(lookup(config, "tie_word_embeddings", default=False)),
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype"):
            if lookup(config, key) is not MISSING:
                out[key] = config[key]
        ops = [
            "config.json: architectures -> Starcoder2ForCausalLM, layer_norm_eps -> layer_norm_epsilon, rotary_pct -> partial_rotary_factor, rotary_emb_base -> rope_theta",
            "tensors: gpt_neox.* -> model.*, embed_in -> embed_tokens, final_layer_norm -> norm, embed_out -> lm_head, "
            "attention.dense -> self_attn.o_proj, mlp.dense_h_to_4h/dense_4h_to_h -> mlp.c_fc/c_proj",
            "tensors: attention.query_key_value split per head ([heads, 3, head_dim] rows) into self_attn.q/k/v_proj, weight and bias",
        ]
        if not attention_bias:
            ops.append("attention_bias = false: zero q/k/v/o biases (StarCoder2 always has them)")
        differences = [] if act_exact else [
            f"GELU: the source's hidden_act {act!r} is the {act_form}; exllamav2 computes the tanh approximation "
            f"(max |difference| {GELU_MAX_ABS_DIFF:g} per activation)"
        ]
        out[CONFIG_KEY] = {"adapter": self.name, "source_architecture": arch, "status": row.status, "differences": differences}
        return AdapterPlan(adapter=self.name, source_arch=arch, target_arch=row.target, status=row.status, exact=act_exact,
                           config=out, tensor_ops=ops, differences=differences)

    def tensor_plan(self, plan: AdapterPlan, tensors: dict[str, TensorInfo]) -> list[Out]:
        c, arch = plan.config, plan.source_arch
        h, n, inter = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
        d = h // n
        head = next((k for k in ("embed_out.weight", "lm_head.weight") if k in tensors), None)
        if head is None and not c["tie_word_embeddings"]:
            raise AdapterCheckpointMismatch(arch, "no embed_out.weight (or lm_head.weight) although tie_word_embeddings is false")
        bias = any(k.endswith("attention.query_key_value.bias") for k in tensors)
        q_rows, k_rows, v_rows = split_rows(n, d)
        shapes: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (c["vocab_size"], h),
                                              "gpt_neox.final_layer_norm.weight": (h,), "gpt_neox.final_layer_norm.bias": (h,)}
        outs = [Out("model.embed_tokens.weight", "gpt_neox.embed_in.weight"),
                Out("model.norm.weight", "gpt_neox.final_layer_norm.weight"), Out("model.norm.bias", "gpt_neox.final_layer_norm.bias")]
        if head is not None:
            shapes[head] = (c["vocab_size"], h)
            outs.append(Out("lm_head.weight", head))
        for i in range(c["num_hidden_layers"]):
            s, t = f"gpt_neox.layers.{i}.", f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                for part in ("weight", "bias"):
                    shapes[f"{s}{norm}.{part}"] = (h,)
                    outs.append(Out(f"{t}{norm}.{part}", f"{s}{norm}.{part}"))
            qkv = s + "attention.query_key_value."
            shapes[qkv + "weight"] = (3 * h, h)
            shapes[s + "attention.dense.weight"] = (h, h)
            for proj, rows in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
                outs.append(Out(f"{t}self_attn.{proj}.weight", qkv + "weight", rows=rows))
                if bias:
                    outs.append(Out(f"{t}self_attn.{proj}.bias", qkv + "bias", rows=rows))
            outs.append(Out(f"{t}self_attn.o_proj.weight", s + "attention.dense.weight"))
            if bias:
                shapes[qkv + "bias"] = (3 * h,)
                shapes[s + "attention.dense.bias"] = (h,)
                outs.append(Out(f"{t}self_attn.o_proj.bias", s + "attention.dense.bias"))
            for src, dst, shape in (("dense_h_to_4h", "c_fc", (inter, h)), ("dense_4h_to_h", "c_proj", (h, inter))):
                shapes[f"{s}mlp.{src}.weight"] = shape
                shapes[f"{s}mlp.{src}.bias"] = (shape[0],)
                outs += [Out(f"{t}mlp.{dst}.weight", f"{s}mlp.{src}.weight"), Out(f"{t}mlp.{dst}.bias", f"{s}mlp.{src}.bias")]
        ignored = {k for k in tensors if k.endswith(IGNORED_SUFFIXES)}
        expect_tensors(arch, tensors, outs, ignored)
        for name, shape in shapes.items():
            expect_shape(arch, tensors, name, shape)
        if not bias:
            dtype = tensors["gpt_neox.layers.0.attention.query_key_value.weight"].dtype
            for i in range(c["num_hidden_layers"]):
                outs += [Out(f"model.layers.{i}.self_attn.{p}.bias", zeros=((h,), dtype)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        return outs


ADAPTER = GPTNeoXAdapter()
