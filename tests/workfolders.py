"""Builders for the card and publish tests: seed model folders, and tiny converted work folders written
through quantkit.workfolder's records (the same models the pipeline writes), with tiny shards."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from quantkit.branches import Branch
from quantkit.workfolder import (
    BranchCalibration,
    BranchProvenance,
    MeasurementProvenance,
    Settings,
    SettingsRecord,
    Work,
    write_record,
)

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


FINGERPRINT = "f1" * 32
CALIBRATION_SHA256 = "ab" * 32


def make_work(tmp_path: Path, *, source: str = "alice/tiny-llama", branches: tuple[str, ...] = ("8_0", "6_5"),
              model_folder: Path | None = None, name: str = "work", config: dict | None = None) -> Path:
    """A converted work folder as the pipeline leaves it, with tiny shards."""
    work = Work(tmp_path / name)
    model = str(model_folder) if model_folder else source
    work.root.mkdir(parents=True)
    work.measurement.write_text(json.dumps({"measurement": {"model.layers.0": []}, "last_module_idx": 1}))
    measurement_sha256 = hashlib.sha256(work.measurement.read_bytes()).hexdigest()
    specs = [Branch(name=b, bits=float(b.replace("_", "."))) for b in branches]
    write_record(work.settings, SettingsRecord(settings=Settings(model=model, branches=specs), model_fingerprint=FINGERPRINT,
                                             model_dir=model))
    write_record(work.provenance, MeasurementProvenance(
        model_ref=model, model_fingerprint=FINGERPRINT, calibration="default", calibration_sha256=CALIBRATION_SHA256,
        rows=100, length=2048, exllamav2_version="0.3.2", measurement_sha256=measurement_sha256))
    for i, b in enumerate(specs):
        out = work.out(b.name)
        out.mkdir(parents=True)
        tiny_tensors(out / "output.safetensors", i)
        cfg = dict(config or (json.loads((model_folder / "config.json").read_text()) if model_folder else TINY_LLAMA))
        cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.3.2", "bits": b.bits, "head_bits": b.head_bits}
        (out / "config.json").write_text(json.dumps(cfg))
        if model_folder is not None:
            for f in model_folder.iterdir():
                if f.name not in ("config.json", "README.md"):
                    shutil.copy(f, out / f.name)
        else:
            (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
        write_record(work.branch_provenance(b.name), branch_provenance(b.name, b.bits, source=source, folder=out))
    return work.root


def branch_provenance(branch: str, bits: float, *, source: str = "alice/tiny-llama", folder: Path | None = None,
                      removed: list[str] | None = None) -> BranchProvenance:
    """quantkit.json of a converted branch, as the pipeline writes it (achieved = target, for the tests)."""
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder is not None else 0
    return BranchProvenance(
        branch=branch, bits=bits, head_bits=8, achieved_decoder_bpw=bits, achieved_head_bpw=8.0, bytes=size,
        reachable_bpw=(2.1, 8.04), measurement_sha256="00" * 32, source_model=source, model_fingerprint=FINGERPRINT,
        calibration=BranchCalibration(name="default", sha256=CALIBRATION_SHA256, rows=100, length=2048,
                                      measurement_rows=100, measurement_length=2048),
        exllamav2_version="0.3.2", removed_from_source_copy=removed or [])
