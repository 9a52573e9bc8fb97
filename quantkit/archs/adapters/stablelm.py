"""StableLM (StableLmForCausalLM, and the remote-code StableLMEpochForCausalLM) -> exllamav2's Orion.

Why Orion: exllamav2 0.3.2 `architecture.py` builds OrionForCausalLM from the Llama keys (q/k/v/o_proj,
gate/up/down_proj, input_/post_attention_layernorm, model.norm, lm_head) with `norm = "layernorm"`:
LayerNorm with its bias (layernorm.py loads `.bias` when present), Llama attention, gated SiLU MLP. A
StableLM decoder layer is exactly that:

    x = x + o_proj(attn(rope(q_proj(ln1(x))), rope(k_proj(ln1(x))), v_proj(ln1(x))))
    x = x + down_proj(silu(gate_proj(ln2(x))) * up_proj(ln2(x)))

Rotary: StableLM rotates `int(head_dim * partial_rotary_factor)` leading dims of each head, NeoX style
(rotate_half of that slice). exllamav2 reads `partial_rotary_factor` for every architecture (config.py)
and its NeoX kernel (rope.cu) rotates columns [0, d/2) against [d/2, d) of the first d = int(head_dim *
factor) dims (sin/cos tables are d wide), leaving the rest: the same.

Biases: StableLM's q/k/v have a bias when `use_qkv_bias`; its o_proj never does. Orion expects none, and
exllamav2's only switch is `attention_bias` in config.json, which turns on q/k/v AND o bias (the
"Arch overrides" block of architecture.py), and linear.py asserts a bias exists when expected. So
with q/k/v bias the working copy sets `attention_bias: true` and adds a zero `o_proj.bias`.

The tensor names are already Orion's, so no tensor changes except those zero biases: the shards are
hard-linked and the zero biases go in one small new shard.

Not mapped (refused by name): `qk_layernorm` (StableLM-2-12B's per-head q/k LayerNorm) and
`use_parallel_residual` (attention and MLP from one LayerNorm in parallel; exllamav2's only parallel
block is Cohere's, which rotates GPT-J style).
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
from quantkit.errors import AdapterRefused
from quantkit.hfconfig import MISSING, lookup

# transformers 5 StableLmConfig defaults, used when config.json omits a key (transformers 5 saves only
# what differs from them); the remote-code StableLMEpochConfig has the same ones.
DEFAULT_EPS = 1e-5
DEFAULT_ROTARY_FRACTION = 0.25
DEFAULT_THETA = 10000.0

# Buffers some old checkpoints saved that carry no weights (the remote code's rotary inv_freq).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class StableLmAdapter(Adapter):
    name = "stablelm"
    sources = ("StableLmForCausalLM", "StableLMEpochForCausalLM")

    def check(self, config: dict[str, Any]) -> AdapterPlan:
        arch = str(config["architectures"][0])
        row = entry(arch)
        assert row is not None and row.adapter == self.name

        for feature, why in (
            ("qk_layernorm", "per-head LayerNorm of q and k (StableLM-2-12B); Orion's attention has none"),
            ("use_parallel_residual", "attention and MLP in parallel from one LayerNorm (StableLM-2-12B); exllamav2's only "
                                      "parallel block (Cohere) rotates GPT-J style, StableLM NeoX style"),
        ):
            if lookup(config, feature, default=False):
                raise AdapterRefused(arch, f"{feature} = true", why)
        act = lookup(config, "hidden_act", default="silu")
        if act != "silu":
            raise AdapterRefused(arch, f"hidden_act = {act!r}", "Orion's gated MLP uses SiLU only")
        if lookup(config, "rotary_scaling_factor", default=1.0) != 1.0:
            raise AdapterRefused(arch, "rotary_scaling_factor", "scaled RoPE is not mapped by the adapter")

        hidden = need_int(config, arch, "hidden", "hidden_size")
        layers = need_int(config, arch, "layers", "num_hidden_layers")
        heads = need_int(config, arch, "heads", "num_attention_heads", "num_heads")
        kv_heads = lookup(config, "num_key_value_heads", default=heads)
        intermediate = need_int(config, arch, "intermediate", "intermediate_size")
        vocab = need_int(config, arch, "vocab", "vocab_size")
        if hidden % heads or heads % kv_heads:
            raise AdapterRefused(arch, "num_attention_heads", f"hidden {hidden}, {heads} heads, {kv_heads} KV heads do not divide")
        eps = lookup(config, "layer_norm_eps", "norm_eps", default=DEFAULT_EPS)
        theta, fraction = rope_params(config, arch, theta_keys=("rope_theta",), fraction_keys=("partial_rotary_factor", "rope_pct"),
                                      default_fraction=DEFAULT_ROTARY_FRACTION)
        check_rotary_dim(arch, hidden // heads, fraction)
        qkv_bias = bool(lookup(config, "use_qkv_bias", default=False))

        out: dict[str, Any] = {
            "architectures": [row.target],
            "model_type": "orion",
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            # exllamav2 reads Orion's LayerNorm epsilon from `rms_norm_eps` (architecture.py keys["norm_eps"]
            # default), as Orion's own config.json names it.
            "rms_norm_eps": float(eps),
            "hidden_act": "silu",
            "rope_theta": theta,
            "partial_rotary_factor": fraction,
            "max_position_embeddings": lookup(config, "max_position_embeddings", default=4096),
            "vocab_size": vocab,
            "tie_word_embeddings": bool(lookup(config, "tie_word_embeddings", default=False)),
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype"):
            if lookup(config, key) is not MISSING:
                out[key] = config[key]
        ops = ["config.json: architectures -> OrionForCausalLM, layer norm epsilon -> rms_norm_eps, rotary fraction -> partial_rotary_factor",
               "tensors: names unchanged (StableLM already uses Orion's names); shards hard-linked"]
        if qkv_bias:
            # architecture.py: attention_bias sets both q/k/v and o bias; StableLM's o_proj has none.
            out["attention_bias"] = True
            ops.append("attention_bias = true (q/k/v bias) and a zero self_attn.o_proj.bias per layer in a new shard")
        out[CONFIG_KEY] = {"adapter": self.name, "source_architecture": arch, "status": row.status}
        return AdapterPlan(adapter=self.name, source_arch=arch, target_arch=row.target, status=row.status, exact=True,
                           config=out, tensor_ops=ops, differences=[])

    def tensor_plan(self, plan: AdapterPlan, tensors: dict[str, TensorInfo]) -> list[Out]:
        c, arch = plan.config, plan.source_arch
        h, n, d = c["hidden_size"], c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
        kv, inter = c["num_key_value_heads"], c["intermediate_size"]
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,), "model.norm.bias": (h,)}
        if not c["tie_word_embeddings"] or "lm_head.weight" in tensors:
            shapes["lm_head.weight"] = (c["vocab_size"], h)
        bias = bool(c.get("attention_bias"))
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
                p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
                p + "self_attn.q_proj.weight": (n * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, n * d),
                p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter),
            }
            if bias:
                shapes |= {p + "self_attn.q_proj.bias": (n * d,), p + "self_attn.k_proj.bias": (kv * d,), p + "self_attn.v_proj.bias": (kv * d,)}
        outs = [Out(name, source=name) for name in shapes]
        ignored = {t for t in tensors if t.endswith(IGNORED_SUFFIXES)}
        expect_tensors(arch, tensors, outs, ignored)
        for name, shape in shapes.items():
            expect_shape(arch, tensors, name, shape)
        if bias:
            dtype = tensors["model.layers.0.self_attn.q_proj.bias"].dtype
            outs += [Out(f"model.layers.{i}.self_attn.o_proj.bias", zeros=((h,), dtype)) for i in range(c["num_hidden_layers"])]
        return outs


ADAPTER = StableLmAdapter()
