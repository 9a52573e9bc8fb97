"""Tiny StableLM and GPT-NeoX checkpoints built from a numpy seed, and a numpy forward pass of the
TARGET architectures as exllamav2 0.3.2 computes them, read from an adapter's working copy.

Shared by the tests (numpy only) and `scripts/adapters_cpu_proof.py` (which adds transformers to
record the source models' logits in tests/fixtures/adapters/). The weights are not committed: they are
rebuilt from the seed, and the fixture's sha256 of the weight file guards against a drifting generator.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adapters"
TOKENS = [1, 17, 42, 5, 88, 23, 60, 9, 71, 33, 2, 50, 14, 95, 38, 77]

HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 4, 96

#: case -> source config.json, in each architecture's own spelling (the epoch and NeoX ones in the
#: pre-transformers-5 keys real checkpoints carry).
CASES: dict[str, dict[str, Any]] = {
    "stablelm": {
        "architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "hidden_size": HIDDEN, "intermediate_size": 96,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "layer_norm_eps": 1e-5, "partial_rotary_factor": 0.25, "rope_theta": 10000, "use_qkv_bias": True,
        "hidden_act": "silu", "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
    },
    "stablelm-epoch": {
        "architectures": ["StableLMEpochForCausalLM"], "model_type": "stablelm_epoch", "hidden_size": HIDDEN, "intermediate_size": 96,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "norm_eps": 1e-5, "rope_pct": 0.5, "rope_theta": 500, "rotary_scaling_factor": 1.0, "hidden_act": "silu",
        "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
    },
    "gpt-neox": {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": HIDDEN, "intermediate_size": 256,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "vocab_size": VOCAB, "layer_norm_eps": 1e-5,
        "rotary_pct": 1.0, "rotary_emb_base": 10000, "use_parallel_residual": False, "hidden_act": "gelu",
        "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
    },
    "gpt-neox-partial-rotary": {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": HIDDEN, "intermediate_size": 256,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "vocab_size": VOCAB, "layer_norm_eps": 1e-5,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": False, "hidden_act": "gelu",
        "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
    },
}


def _weights(case: str, config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * d

    def lin(o: int, i: int) -> np.ndarray:
        return (rng.uniform(-1, 1, (o, i)) * math.sqrt(3 / i)).astype(np.float32)

    def vec(n: int, centre: float = 0.0, spread: float = 0.1) -> np.ndarray:
        return (centre + rng.uniform(-spread, spread, n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    if case.startswith("stablelm"):
        w["model.embed_tokens.weight"] = vec(v * h, spread=1.0).reshape(v, h)
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            for n in ("input_layernorm", "post_attention_layernorm"):
                w[p + n + ".weight"], w[p + n + ".bias"] = vec(h, 1.0, 0.2), vec(h)
            w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"] = lin(h, h), lin(kv, h)
            w[p + "self_attn.v_proj.weight"], w[p + "self_attn.o_proj.weight"] = lin(kv, h), lin(h, h)
            if config.get("use_qkv_bias"):
                w[p + "self_attn.q_proj.bias"], w[p + "self_attn.k_proj.bias"], w[p + "self_attn.v_proj.bias"] = vec(h), vec(kv), vec(kv)
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"] = lin(inter, h), lin(inter, h), lin(h, inter)
        w["model.norm.weight"], w["model.norm.bias"] = vec(h, 1.0, 0.2), vec(h)
        w["lm_head.weight"] = lin(v, h)
    else:
        w["gpt_neox.embed_in.weight"] = vec(v * h, spread=1.0).reshape(v, h)
        for i in range(config["num_hidden_layers"]):
            p = f"gpt_neox.layers.{i}."
            for n in ("input_layernorm", "post_attention_layernorm"):
                w[p + n + ".weight"], w[p + n + ".bias"] = vec(h, 1.0, 0.2), vec(h)
            w[p + "attention.query_key_value.weight"], w[p + "attention.query_key_value.bias"] = lin(3 * h, h), vec(3 * h)
            w[p + "attention.dense.weight"], w[p + "attention.dense.bias"] = lin(h, h), vec(h)
            w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"] = lin(inter, h), vec(inter)
            w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"] = lin(h, inter), vec(h)
        w["gpt_neox.final_layer_norm.weight"], w["gpt_neox.final_layer_norm.bias"] = vec(h, 1.0, 0.2), vec(h)
        w["embed_out.weight"] = lin(v, h)
    return w


def build(case: str, folder: Path, seed: int = 6, **change: Any) -> str:
    """Write the tiny source checkpoint (config.json, model.safetensors, a tokenizer stand-in); returns
    the sha256 of model.safetensors. `change`: config keys to override (the real converter needs a
    vocabulary as large as the tokenizer the tests train)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = CASES[case] | change
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}')
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    save_file(_weights(case, config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


# ---- exllamav2 0.3.2's block, in numpy -----------------------------------------------------------------

#: What architecture.py sets for the two targets (keys not listed are exllamav2's Llama defaults).
TARGETS: dict[str, dict[str, Any]] = {
    "OrionForCausalLM": {"eps_key": "rms_norm_eps", "gated": True, "act": "silu", "up": "mlp.up_proj", "gate": "mlp.gate_proj",
                         "down": "mlp.down_proj", "qkv_bias": False, "o_bias": False, "mlp_bias": False, "head_alt": None},
    "Starcoder2ForCausalLM": {"eps_key": "layer_norm_epsilon", "gated": False, "act": "gelu", "up": "mlp.c_fc", "gate": None,
                              "down": "mlp.c_proj", "qkv_bias": True, "o_bias": True, "mlp_bias": True, "head_alt": "model.embed_tokens"},
}


def _layernorm(x: np.ndarray, w: dict[str, np.ndarray], key: str, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w[key + ".weight"]
    return y + w[key + ".bias"] if key + ".bias" in w else y


def _linear(x: np.ndarray, w: dict[str, np.ndarray], key: str, bias: bool) -> np.ndarray:
    # linear.py load(): "has bias but bias is not expected" / "has no bias tensor but bias is expected"
    assert (key + ".bias" in w) == bias, f"{key}: bias {'missing' if bias else 'not expected'} (exllamav2 would refuse to load)"
    y = x @ w[key + ".weight"].T
    return y + w[key + ".bias"] if bias else y


def _rope_neox(x: np.ndarray, rot: int, theta: float) -> np.ndarray:
    """rope.cu rope_cuda_arr_neox over the first `rot` dims of each head: pairs (c, c + rot/2)."""
    n = x.shape[0]
    inv_freq = 1.0 / theta ** (np.arange(0, rot, 2) / rot)  # rope.py get_rope_params_default
    freqs = np.outer(np.arange(n), inv_freq)
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin, x[..., rot:]], axis=-1)


def gelu(x: np.ndarray, form: str) -> np.ndarray:
    if form == "tanh":  # exllamav2: q_mlp_activation.cuh gelu(), mlp.py F.gelu(approximate="tanh")
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf)  # transformers' GELUActivation ("gelu"): exact
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def exl2_forward(folder: Path, tokens: list[int], *, gelu_form: str = "tanh") -> np.ndarray:
    """Logits (float64) of the working copy in `folder`, computed the way exllamav2 0.3.2 builds its
    `architectures[0]` (config.py reads, architecture.py keys and bias flags, attn.py, mlp.py)."""
    cfg = json.loads((folder / "config.json").read_text())
    t = TARGETS[cfg["architectures"][0]]
    w: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        w |= {k: v.astype(np.float64) for k, v in load_file(str(shard)).items()}
    eps = float(cfg[t["eps_key"]])
    qkv_bias, o_bias, mlp_bias = t["qkv_bias"], t["o_bias"], t["mlp_bias"] or bool(cfg.get("mlp_bias"))
    if cfg.get("attention_bias") and not (qkv_bias or o_bias):  # architecture.py "Arch overrides"
        qkv_bias = o_bias = True
    h, n = cfg["hidden_size"], cfg["num_attention_heads"]
    d = cfg.get("head_dim", h // n)
    kvh = cfg.get("num_key_value_heads", n)
    rot = int(d * cfg.get("partial_rotary_factor", 1.0))
    theta = float(cfg.get("rope_theta", 10000.0))
    s = len(tokens)
    mask = np.triu(np.full((s, s), -np.inf), 1)

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _layernorm(x, w, p + "input_layernorm", eps)
        q = _linear(a, w, p + "self_attn.q_proj", qkv_bias).reshape(s, n, d)
        k = _linear(a, w, p + "self_attn.k_proj", qkv_bias).reshape(s, kvh, d)
        v = _linear(a, w, p + "self_attn.v_proj", qkv_bias).reshape(s, kvh, d)
        q, k = _rope_neox(q, rot, theta), _rope_neox(k, rot, theta)
        k, v = np.repeat(k, n // kvh, axis=1), np.repeat(v, n // kvh, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = np.einsum("hqk,khd->qhd", scores / scores.sum(-1, keepdims=True), v).reshape(s, n * d)
        x = x + _linear(attn, w, p + "self_attn.o_proj", o_bias)
        m = _layernorm(x, w, p + "post_attention_layernorm", eps)
        up = _linear(m, w, p + t["up"], mlp_bias)
        if t["gated"]:
            g = _linear(m, w, p + t["gate"], mlp_bias)
            y = g / (1 + np.exp(-g)) * up
        else:
            y = gelu(up, gelu_form)
        x = x + _linear(y, w, p + t["down"], mlp_bias)
    x = _layernorm(x, w, "model.norm", eps)
    head = "lm_head" if "lm_head.weight" in w else (t["head_alt"] or ("model.embed_tokens" if cfg.get("tie_word_embeddings") else None))
    assert head is not None, "no lm_head (exllamav2 check_keys would refuse)"
    return x @ w[head + ".weight"].T


def load_fixture(case: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{case}.json").read_text())
