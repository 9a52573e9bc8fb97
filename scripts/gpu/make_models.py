"""Small random-weight Hugging Face models in the shapes of quantkit's seed architectures.

Each folder is what exllamav2 0.3.2's converter and loader read: config.json, fp16 safetensors shards
with a model.safetensors.index.json (as real sharded checkpoints have, so quantkit's cleaning of the
stale index is exercised), a byte-level BPE tokenizer.json (exllamav2 >= 0.3.1 refuses models without
one), tokenizer_config.json, special_tokens_map.json and generation_config.json.

The shapes keep what the VRAM estimator is sensitive to: the real vocabulary (Llama 3's 128256,
Starling's 32002), head_dim 128 and the 4:1 query:KV head ratio (32/8); they scale down the depth and
width so that measure + three conversions run in minutes on one GPU. The weights are N(0, 0.02) noise:
the models speak gibberish, which is all the converter and the VRAM measurement need.

numpy, safetensors and tokenizers only (no torch), so it runs on the GPU machine from a bare start and
on CPU-only test machines.

    python scripts/gpu/make_models.py OUT_DIR                     # both shapes, default size
    python scripts/gpu/make_models.py OUT_DIR --shape llama3 --layers 2 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HEAD_DIM = 128


@dataclass(frozen=True)
class Shape:
    """One seed architecture scaled down. `q_per_kv` is kept from the real model (32 / 8 = 4)."""

    name: str
    arch: str
    model_type: str
    vocab: int
    layers: int
    hidden: int
    q_per_kv: int
    inter_ratio: float  # intermediate_size / hidden_size of the real model
    rope_theta: float
    max_positions: int
    rms_norm_eps: float
    leading_specials: tuple[str, ...]  # ids 0.. of the BPE vocabulary
    trailing_specials: tuple[str, ...]  # added tokens after the base vocabulary, ending at vocab - 1
    bos: str
    eos: str
    extra_config: tuple[tuple[str, object], ...] = ()

    @property
    def heads(self) -> int:
        if self.hidden % HEAD_DIM:
            raise ValueError(f"hidden {self.hidden} must be a multiple of head_dim {HEAD_DIM}")
        return self.hidden // HEAD_DIM

    @property
    def kv_heads(self) -> int:
        if self.heads % self.q_per_kv:
            raise ValueError(f"{self.heads} heads cannot share KV heads {self.q_per_kv}:1; pick hidden = {HEAD_DIM * self.q_per_kv} x k")
        return self.heads // self.q_per_kv

    @property
    def intermediate(self) -> int:
        # Round to 256 as the real models are (14336 = 3.5 x 4096).
        return max(256, int(round(self.hidden * self.inter_ratio / 256)) * 256)

    @property
    def base_vocab(self) -> int:
        return self.vocab - len(self.trailing_specials)


def _llama3_specials() -> tuple[str, ...]:
    """Meta-Llama-3's 256 added tokens at ids 128000-128255, by name."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tuple(out)


#: Llama-3-8B (LlamaForCausalLM): 4096 hidden, 32 heads / 8 KV heads of 128, 14336 MLP, 128256 vocab.
LLAMA3 = Shape(
    name="llama3-shape", arch="LlamaForCausalLM", model_type="llama", vocab=128256, layers=4, hidden=1024,
    q_per_kv=4, inter_ratio=3.5, rope_theta=500000.0, max_positions=8192, rms_norm_eps=1e-5,
    leading_specials=(), trailing_specials=_llama3_specials(), bos="<|begin_of_text|>", eos="<|end_of_text|>",
)

#: Starling-LM (MistralForCausalLM, a Mistral-7B finetune): 4096 hidden, 32 / 8 heads of 128, 14336 MLP,
#: 32000 SentencePiece pieces + <|end_of_turn|> and <|pad_0|> = 32002; eos is <|end_of_turn|> (32000);
#: Mistral-7B-v0.1's 32768 positions, so the 32k VRAM cells need no RoPE stretching.
MISTRAL = Shape(
    name="mistral-shape", arch="MistralForCausalLM", model_type="mistral", vocab=32002, layers=4, hidden=1024,
    q_per_kv=4, inter_ratio=3.5, rope_theta=10000.0, max_positions=32768, rms_norm_eps=1e-5,
    leading_specials=("<unk>", "<s>", "</s>"), trailing_specials=("<|end_of_turn|>", "<|pad_0|>"),
    bos="<s>", eos="<|end_of_turn|>", extra_config=(("sliding_window", None),),
)

SHAPES = {"llama3": LLAMA3, "mistral": MISTRAL}

#: A little English and code so that byte-level BPE learns common merges (" t", " the", "\n").
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs to the river.",
    "A model that is quantized to fewer bits per weight needs less memory on the GPU than the original.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "In the beginning the tokenizer knew only bytes; then it learned to merge the pairs it saw most often.",
    "Measure once, convert many times: the measurement does not depend on the target bitrate.",
    "Il était une fois un petit modèle. Es war einmal ein kleines Modell. 昔々、小さなモデルがありました。",
]


def config_json(s: Shape) -> dict:
    eos_id = _special_id(s, s.eos)
    cfg = {
        "architectures": [s.arch],
        "model_type": s.model_type,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": HEAD_DIM,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.max_positions,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": _special_id(s, s.bos),
        "eos_token_id": eos_id,
        "torch_dtype": "float16",
        "use_cache": True,
        "initializer_range": 0.02,
        "_quantkit_note": "random weights built by quantkit scripts/gpu/make_models.py; not a language model",
    }
    cfg.update(dict(s.extra_config))
    return cfg


def _special_id(s: Shape, token: str) -> int:
    if token in s.leading_specials:
        return s.leading_specials.index(token)
    return s.base_vocab + s.trailing_specials.index(token)


def tensor_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor by its transformers Llama/Mistral name, (out_features, in_features) for linears."""
    h, i, q, kv = s.hidden, s.intermediate, s.heads * HEAD_DIM, s.kv_heads * HEAD_DIM
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, h)}
    for n in range(s.layers):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    out |= {"model.norm.weight": (h,), "lm_head.weight": (s.vocab, h)}
    return out


def build_tokenizer(s: Shape):  # -> tokenizers.Tokenizer
    """A byte-level BPE trained on CORPUS, padded with never-produced filler pieces to `base_vocab`,
    then the trailing special tokens as added tokens so the total is exactly `vocab`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(s.base_vocab, 2000), special_tokens=list(s.leading_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > s.base_vocab:
        raise ValueError(f"trained {len(vocab)} pieces, more than the base vocabulary {s.base_vocab}")
    # Fillers are plain ASCII, which the byte-level alphabet maps to itself, so they decode as written;
    # no merge produces them, so encoding never does.
    for idx in range(len(vocab), s.base_vocab):
        vocab[f"<|filler_{idx}|>"] = idx
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in s.trailing_specials])
    # Leading specials were added by the trainer; mark them special for decode(skip_special_tokens).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in s.leading_specials])
    if tok.get_vocab_size(with_added_tokens=True) != s.vocab:
        raise ValueError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, config says {s.vocab}")
    return tok


def _tokenizer_files(s: Shape, folder: Path) -> None:
    build_tokenizer(s).save(str(folder / "tokenizer.json"))
    specials = {"bos_token": s.bos, "eos_token": s.eos}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    tcfg = {**specials, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": s.max_positions,
            "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    gen = {"bos_token_id": _special_id(s, s.bos), "eos_token_id": _special_id(s, s.eos)}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float16)
    # N(0, 0.02), transformers' initializer_range: with unit norm weights the residual stream of a few
    # layers stays far from fp16 overflow (exllamav2's measurement aborts on inf or NaN).
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def write_model(s: Shape, folder: Path, *, seed: int = 0, shard_bytes: int = 256 * 1024**2) -> Path:
    """Write the model folder; returns it. Shards in name order, each up to `shard_bytes` (at least one tensor)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(s), indent=2) + "\n")
    _tokenizer_files(s, folder)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(s)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shp in shapes.items():
        nbytes = 2 * math.prod(shp)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        save_file({n: _weight(rng, n, shapes[n]) for n in names}, str(folder / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
    if len(groups) > 1:
        total = sum(2 * math.prod(v) for v in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="parent folder; each model goes to OUT/<shape name>")
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 4)")
    ap.add_argument("--hidden", type=int, help=f"hidden size, a multiple of {HEAD_DIM} x 4 (default: 1024)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=256)
    args = ap.parse_args(argv)
    for key in SHAPES if args.shape == "all" else [args.shape]:
        s = SHAPES[key]
        s = replace(s, layers=args.layers or s.layers, hidden=args.hidden or s.hidden)
        folder = write_model(s, args.out / s.name, seed=args.seed, shard_bytes=args.shard_mb * 1024**2)
        print(f"{folder}: {s.arch} layers={s.layers} hidden={s.hidden} heads={s.heads}/{s.kv_heads}x{HEAD_DIM} "
              f"intermediate={s.intermediate} vocab={s.vocab}")


if __name__ == "__main__":
    main()
