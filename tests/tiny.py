"""Tiny real models for the offline tests: a Llama-shaped checkpoint (random fp16 weights), a byte-level
BPE tokenizer trained on the spot, a chat template, and the files exllamav2 copies into its output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Calibration text should look like what the model will read: prose, code, dialogue. "
    "def add(a, b):\n    return a + b\n"
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(folder: Path, vocab: int = 320) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return tok.get_vocab_size()


def make_tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 256, intermediate: int = 512, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0, peaked: bool = False) -> Path:
    """`peaked`: not the N(0, 0.02) of an untrained model but embeddings std 0.5, linears 0.1, lm_head 0.25
    and norms 1 +- 0.1, so that attention is far from uniform (a non-causal attention shows in the logits)
    and the logits are peaked (top-1 agreement and KL tell 8 bpw from 5 bpw)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 0,
        "eos_token_id": 1, "_name_or_path": "tiny/llama",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * (std if peaked else 0.02)).astype(np.float16)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float16) if peaked else np.ones(hidden, np.float16)

    t = {"model.embed_tokens.weight": w(vocab, hidden, std=0.5), "model.norm.weight": norm(), "lm_head.weight": w(vocab, hidden, std=0.25)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
              p + "self_attn.q_proj.weight": w(heads * head_dim, hidden), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
              p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
              p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
              p + "mlp.down_proj.weight": w(hidden, intermediate)}
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # What a real source folder carries and exllamav2 copies verbatim: a card and an index that will lie.
    (folder / "README.md").write_text("# tiny/llama\nThe source model's card.\n")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in t}}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return folder
