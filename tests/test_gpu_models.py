"""scripts/gpu/make_models.py: the random-weight models the GPU proof converts, checked on CPU.

The presets keep the seed models' vocab and head layout; the folders built here are smaller variants
(small vocab and width) so the test writes a few MB, not the 600 MB of the real-vocab Llama shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CONFIGS, FIXTURES, load_gpu_script
from safetensors import safe_open

from quantkit.cli.main import cli
from quantkit.model import load_model

tokenizers = pytest.importorskip("tokenizers")
mm = load_gpu_script("make_models")

# (preset, the real config it scales down)
PRESETS = [
    ("llama3", CONFIGS / "meta-llama-3-8b.json"),
    ("mistral", FIXTURES / "models" / "starling-lm-11b-alpha" / "config.json"),
]


def small_shape(key: str):
    """The preset at the smallest width with the real 4:1 ratio and a small vocab (a few MB written)."""
    # hidden 512 = 4 query heads of 128 sharing 1 KV head: the smallest width with the real 4:1 ratio.
    return replace(mm.SHAPES[key], layers=2, hidden=512, vocab=len(mm.SHAPES[key].trailing_specials) + 700)


@pytest.mark.parametrize("key,real", PRESETS)
def test_presets_keep_the_real_vocab_and_head_layout(key: str, real: Path) -> None:
    s = mm.SHAPES[key]
    cfg = json.loads(real.read_text())
    real_head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    assert s.arch == cfg["architectures"][0]
    assert s.vocab == cfg["vocab_size"]
    assert mm.HEAD_DIM == real_head_dim
    assert s.heads // s.kv_heads == cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    assert s.intermediate / s.hidden == cfg["intermediate_size"] / cfg["hidden_size"]
    ours = mm.config_json(s)
    assert ours["bos_token_id"] == cfg["bos_token_id"]
    assert ours["eos_token_id"] == cfg["eos_token_id"]


@pytest.fixture(scope="module", params=[k for k, _ in PRESETS])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    s = small_shape(request.param)
    # A small shard limit forces several shards and an index, as real checkpoints have.
    folder = mm.write_model(s, tmp_path_factory.mktemp(request.param) / s.name, shard_bytes=1024**2)
    return s, folder


def test_quantkit_reads_it_with_the_shape_written(built) -> None:
    s, folder = built
    m = load_model(folder)
    assert m.spec.name == s.arch
    assert (m.shape.layers, m.shape.hidden, m.shape.heads, m.shape.kv_heads, m.shape.head_dim, m.shape.vocab) == (
        s.layers, s.hidden, s.heads, s.kv_heads, 128, s.vocab)
    assert m.shape.intermediate == s.intermediate
    assert set(m.tensors) == set(mm.tensor_shapes(s))
    for name, t in m.tensors.items():
        assert t.dtype == "F16"
        assert t.nbytes == 2 * math.prod(t.shape)


def test_shards_and_index_agree(built) -> None:
    _, folder = built
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
        with safe_open(folder / shard, "np") as f:
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == shard)
    total = sum(t.nbytes for t in load_model(folder).tensors.values())
    assert index["metadata"]["total_size"] == total


def test_weights_are_finite_fp16_noise_and_unit_norms(built) -> None:
    import numpy as np

    _, folder = built
    with safe_open(next(folder.glob("model-00001-*.safetensors")), "np") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            assert np.isfinite(w).all()
            if name.endswith("norm.weight"):
                assert (w == 1).all()
            else:
                assert 0.01 < float(w.astype(np.float32).std()) < 0.03


def test_tokenizer_json_loads_and_matches_the_config(built) -> None:
    s, folder = built
    cfg = json.loads((folder / "config.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == cfg["vocab_size"]
    assert tok.token_to_id(s.bos) == cfg["bos_token_id"]
    assert tok.token_to_id(s.eos) == cfg["eos_token_id"]
    text = "The quick brown fox, 2 + 3. Était 昔々"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids) == text  # byte-level: any text round-trips
    assert max(enc.ids) < cfg["vocab_size"]
    # exllamav2's HF tokenizer wrapper asserts " t" encodes to at least one token and maps the space.
    assert tok.encode(" t", add_special_tokens=False).ids
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special == {"bos_token": s.bos, "eos_token": s.eos}


def test_transformers_names_and_shapes(built) -> None:
    """The strongest check of the naming: transformers builds the same state dict from our config."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    s, folder = built
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == s.arch
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == mm.tensor_shapes(s)


def test_quantkit_vram_sizes_it(built) -> None:
    s, folder = built
    res = CliRunner().invoke(cli, ["vram", str(folder), "--bits", "8.0,5.0", "--context", "4k", "--cache", "fp16,q4", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert {(r["bits"], r["cache"]) for r in rows} == {(8.0, "fp16"), (8.0, "q4"), (5.0, "fp16"), (5.0, "q4")}
    by = {(r["bits"], r["cache"]): r for r in rows}
    # FP16 K and V for every layer at 4096 tokens, straight from the shape we wrote.
    assert by[(8.0, "fp16")]["components"]["kv_cache"] == s.layers * 4096 * s.kv_heads * 128 * 2 * 2
    assert by[(8.0, "fp16")]["total_bytes"] > by[(5.0, "fp16")]["total_bytes"]
