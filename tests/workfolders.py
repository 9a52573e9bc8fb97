"""Builders for the card and publish tests: seed model folders and tiny fake work folders (the contract in
the preamble: WORK/measurement.json, provenance, recipe, out/<branch>/ with safetensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = FIXTURES / "models"
TEMPLATES = FIXTURES / "templates"
SEEDS = FIXTURES / "seeds"

#: seed name -> (reference folder, config file inside it, Hub id, license as the source card says)
SEED_MODELS = {
    "rocket-3b": ("rocket-3b", "config.json", "pansophic/rocket-3B", "cc-by-sa-4.0"),
    "stablelm-zephyr-3b": ("stablelm-zephyr-3b", "config.json", "stabilityai/stablelm-zephyr-3b", "other"),
    "llama3-iterative-dpo-8b": ("llama3-iterative-dpo-8b", "config.FALLBACK-derivative-chujiezheng-ExPO.json", "RLHFlow/LLaMA3-iterative-DPO-final", "llama3"),
    "starling-lm-11b-alpha": ("starling-lm-11b-alpha", "config.json", "CallComply/Starling-LM-11B-alpha", "cc-by-nc-4.0"),
    "redpajama-3b-chat": ("redpajama-3b-chat", "config.json", "ikala/redpajama-3b-chat", "cc-by-nc-2.0"),
}

_TOKENIZER_FILES = ("special_tokens_map.json", "tokenizer_config.json", "added_tokens.json", "generation_config.json")


def seed_folder(tmp_path: Path, seed: str, *, card: str | None = None) -> Path:
    """A model folder for a seed: its reference config and tokenizer files, plus the test chat template
    where the real tokenizer_config could not be retrieved (fixtures/templates)."""
    ref, config, _, _ = SEED_MODELS[seed]
    folder = tmp_path / seed
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS / ref / config, folder / "config.json")
    for name in _TOKENIZER_FILES:
        if (MODELS / ref / name).is_file():
            shutil.copy(MODELS / ref / name, folder / name)
    template = TEMPLATES / f"{seed}.tokenizer_config.json"
    if template.is_file():
        shutil.copy(template, folder / "tokenizer_config.json")
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def tiny_tensors(path: Path, seed: int, n: int = 64) -> None:
    rng = np.random.default_rng(seed)
    save_file({"model.layers.0.self_attn.q_proj.q_weight": rng.integers(0, 2**31, size=(n,), dtype=np.int32)}, str(path))


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def make_work(tmp_path: Path, *, source: str = "alice/tiny-llama", branches: tuple[str, ...] = ("8_0", "6_5"),
              model_folder: Path | None = None, name: str = "work", config: dict | None = None) -> Path:
    """A converted work folder as the pipeline leaves it, with tiny shards."""
    work = tmp_path / name
    (work / "out").mkdir(parents=True)
    (work / "measurement.json").write_text(json.dumps({"measurement": {"model.layers.0": []}, "last_module_idx": 1}))
    (work / "measurement.provenance.json").write_text(json.dumps({
        "source_model": str(model_folder) if model_folder else source, "exllamav2_version": "0.3.2",
        "calibration": {"name": "default", "sha256": "ab" * 32}, "rows": 100, "length": 2048,
    }))
    (work / "recipe.json").write_text(json.dumps({"model": str(model_folder) if model_folder else source,
                                                  "branches": [{"name": b, "bits": float(b.replace("_", "."))} for b in branches]}))
    for i, b in enumerate(branches):
        out = work / "out" / b
        out.mkdir()
        tiny_tensors(out / "output.safetensors", i)
        bits = float(b.replace("_", "."))
        cfg = dict(config or (json.loads((model_folder / "config.json").read_text()) if model_folder else TINY_LLAMA))
        cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.3.2", "bits": bits, "head_bits": 8}
        (out / "config.json").write_text(json.dumps(cfg))
        if model_folder is not None:
            for f in model_folder.iterdir():
                if f.name not in ("config.json", "README.md"):
                    shutil.copy(f, out / f.name)
        else:
            (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
        (out / "quantkit.json").write_text(json.dumps({"branch": b, "bits": float(b.replace("_", ".")), "head_bits": 8, "source_model": source}))
    return work
