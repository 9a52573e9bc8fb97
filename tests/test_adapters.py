"""The StableLM and GPT-NeoX adapters. Every rewrite against hand-built tiny checkpoints, the
refusals, the working-copy rules, and equivalence: a numpy forward of exllamav2's target block on the
working copy reproduces transformers' logits of the original model (tests/fixtures/adapters, made by
scripts/adapters_cpu_proof.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from adapters_tiny import CASES, TOKENS, build, exl2_forward, load_fixture
from conftest import FIXTURES, model_folder
from quantkit import archs
from quantkit.archs import adapters
from quantkit.archs.adapters import gpt_neox
from quantkit.cli.errors import format_error
from quantkit.errors import (
    AdapterCheckpointMismatch,
    AdapterRefused,
    AdapterTargetInvalid,
    MissingConfigKey,
    MissingExtra,
    NoWeights,
)
from quantkit.model import load_model

MODELS = FIXTURES / "models"


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---- registry and planner ---------------------------------------------------------------------------


def test_registry_targets_are_exllamav2_architectures_and_modules_agree():
    table = {a.name for a in archs.supported()}
    for e in adapters.entries():
        assert e.target in table
        assert e.source in adapters.get(e.source).sources
        assert e.experimental  # nothing is GPU-proven yet (no benchmarks/gpu/adapters.json)
    assert {e.source for e in adapters.entries()} == {"StableLmForCausalLM", "StableLMEpochForCausalLM", "GPTNeoXForCausalLM"}


@pytest.mark.parametrize("path, source, target, rotary_dim, intermediate", [
    (MODELS / "rocket-3b/config.json", "StableLmForCausalLM", "OrionForCausalLM", 20, 6912),
    (MODELS / "rocket-3b/config.pre-345305d.from-commit-diff.json", "StableLMEpochForCausalLM", "OrionForCausalLM", 20, 6912),
    (MODELS / "stablelm-zephyr-3b/config.json", "StableLmForCausalLM", "OrionForCausalLM", 20, 6912),
    (MODELS / "stablelm-3b-4e1t/config.original-846682b-StableLMEpoch.json", "StableLMEpochForCausalLM", "OrionForCausalLM", 20, 6912),
    # RedPajama: rotary_pct 1.0 over head_dim 80, plain GELU MLP of 10240.
    (MODELS / "redpajama-3b-chat/config.json", "GPTNeoXForCausalLM", "Starcoder2ForCausalLM", 80, 10240),
])
def test_seed_models_are_sized_as_their_adapted_shape(tmp_path, path, source, target, rotary_dim, intermediate):
    m = load_model(model_folder(tmp_path, path))
    assert (m.adapter.source_arch, m.spec.name, m.shape.arch) == (source, target, target)
    assert (m.shape.layers, m.shape.hidden, m.shape.heads, m.shape.head_dim) == (32, 2560, 32, 80)
    assert (m.shape.rotary_dim, m.shape.intermediate, m.shape.tied_embeddings) == (rotary_dim, intermediate, False)
    assert m.adapter.experimental and m.config["architectures"] == [source]
    assert archs.resolve(json.loads(path.read_text())).name == target


# ---- refusals, before any work ------------------------------------------------------------------------

STABLELM = json.loads((MODELS / "stablelm-zephyr-3b/config.json").read_text())
NEOX = json.loads((MODELS / "redpajama-3b-chat/config.json").read_text())


@pytest.mark.parametrize("base, change, feature", [
    (STABLELM, {"qk_layernorm": True}, "qk_layernorm = true"),  # StableLM-2-12B
    (STABLELM, {"use_parallel_residual": True}, "use_parallel_residual = true"),  # StableLM-2-12B
    (STABLELM, {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    (STABLELM, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = 'linear'"),
    (STABLELM, {"partial_rotary_factor": 0.125}, "partial_rotary_factor"),  # 10 of 80 dims: not a multiple of 4
    (NEOX, {"use_parallel_residual": True}, "use_parallel_residual = true"),  # Pythia, GPT-NeoX-20B
    (NEOX, {"use_parallel_residual": None}, "use_parallel_residual = true (the transformers default)"),
    (NEOX, {"hidden_act": "relu"}, "hidden_act = 'relu'"),
    (NEOX, {"rotary_pct": 0.025}, "partial_rotary_factor"),  # 2 of 80 dims
    (NEOX, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type = 'yarn'"),
])
def test_unmappable_features_are_refused_by_name(base, change, feature):
    config = {k: v for k, v in (base | change).items() if v is not None}
    with pytest.raises(AdapterRefused) as info:
        archs.resolve(config)
    assert info.value.feature.startswith(feature)
    assert feature in format_error(info.value) and "cannot map" in format_error(info.value)


@pytest.mark.parametrize("base, key, field", [(STABLELM, "hidden_size", "hidden"), (NEOX, "intermediate_size", "intermediate"),
                                              (NEOX, "vocab_size", "vocab")])
def test_missing_keys_are_named(base, key, field):
    config = {k: v for k, v in base.items() if k != key}
    with pytest.raises(MissingConfigKey) as info:
        adapters.check(config)
    assert info.value.field == field and key in info.value.aliases and key in format_error(info.value)


# ---- the rewrites, on hand-built checkpoints -----------------------------------------------------------


def _neox_folder(tmp_path: Path, *, bias: bool = True, heads: int = 2, d: int = 4) -> Path:
    h = heads * d
    cfg = CASES["gpt-neox"] | {"hidden_size": h, "num_attention_heads": heads, "intermediate_size": 3 * h, "num_hidden_layers": 1,
                               "vocab_size": 5, "attention_bias": bias}
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    # Row r of the fused weight holds the value r in every column, and the fused bias is 1000 + r, so
    # each split row says where it came from.
    w = {"gpt_neox.layers.0.attention.query_key_value.weight": np.repeat(np.arange(3 * h, dtype=np.float32)[:, None], h, 1),
         "gpt_neox.layers.0.attention.dense.weight": np.eye(h, dtype=np.float32),
         "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": np.ones((3 * h, h), np.float32), "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": np.zeros(3 * h, np.float32),
         "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": np.ones((h, 3 * h), np.float32), "gpt_neox.layers.0.mlp.dense_4h_to_h.bias": np.zeros(h, np.float32),
         "gpt_neox.embed_in.weight": np.zeros((5, h), np.float32), "embed_out.weight": np.full((5, h), 2.0, np.float32),
         "gpt_neox.final_layer_norm.weight": np.ones(h, np.float32), "gpt_neox.final_layer_norm.bias": np.zeros(h, np.float32),
         "gpt_neox.layers.0.attention.masked_bias": np.zeros(1, np.float32)}  # an old buffer: dropped
    for n in ("input_layernorm", "post_attention_layernorm"):
        w[f"gpt_neox.layers.0.{n}.weight"], w[f"gpt_neox.layers.0.{n}.bias"] = np.ones(h, np.float32), np.zeros(h, np.float32)
    if bias:
        w["gpt_neox.layers.0.attention.query_key_value.bias"] = 1000 + np.arange(3 * h, dtype=np.float32)
        w["gpt_neox.layers.0.attention.dense.bias"] = np.full(h, 7.0, np.float32)
    save_file(w, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(str(shard))
    return out


def test_gpt_neox_split_is_per_head_interleaved(tmp_path):
    src = _neox_folder(tmp_path)
    before = _snapshot(src)
    copy = adapters.prepare(src, tmp_path / "work")
    t = _tensors(copy.path)
    d = 4
    # head 0: rows 0-3 q, 4-7 k, 8-11 v; head 1: rows 12-15 q, 16-19 k, 20-23 v
    assert t["model.layers.0.self_attn.q_proj.weight"][:, 0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert t["model.layers.0.self_attn.k_proj.weight"][:, 0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    assert t["model.layers.0.self_attn.v_proj.weight"][:, 0].tolist() == [8, 9, 10, 11, 20, 21, 22, 23]
    assert t["model.layers.0.self_attn.q_proj.bias"].tolist() == [1000 + r for r in (0, 1, 2, 3, 12, 13, 14, 15)]
    assert t["model.layers.0.self_attn.v_proj.bias"].tolist() == [1000 + r for r in (8, 9, 10, 11, 20, 21, 22, 23)]
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (2 * d, 2 * d)
    assert (t["model.layers.0.self_attn.o_proj.bias"] == 7).all() and (t["lm_head.weight"] == 2).all()
    assert set(t) == {
        "model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight",
        *(f"model.layers.0.{n}.{p}" for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                                               "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")),
    }
    config = json.loads((copy.path / "config.json").read_text())
    assert config["architectures"] == ["Starcoder2ForCausalLM"] and config["layer_norm_epsilon"] == 1e-5
    assert config["partial_rotary_factor"] == 1.0 and config["tie_word_embeddings"] is False
    assert copy.files["tokenizer.json"] == "copied" and "model.safetensors" not in copy.files
    index = json.loads((copy.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    assert _snapshot(src) == before  # the user's folder is untouched


def test_gpt_neox_without_attention_bias_gets_zero_biases(tmp_path):
    copy = adapters.prepare(_neox_folder(tmp_path, bias=False), tmp_path / "work")
    t = _tensors(copy.path)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert t[f"model.layers.0.self_attn.{p}.bias"].shape == (8,) and not t[f"model.layers.0.self_attn.{p}.bias"].any()


def test_stablelm_links_shards_and_adds_zero_o_bias_in_source_dtype(tmp_path):
    import ml_dtypes

    src = tmp_path / "src"
    build("stablelm", src)
    # Re-save as bfloat16, as the real checkpoints are.
    w = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    copy = adapters.prepare(src, tmp_path / "work")
    assert copy.files["model.safetensors"] == "linked"
    assert (copy.path / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    assert copy.files["model-adapted-00001.safetensors"] == "written"
    with safe_open(str(copy.path / "model-adapted-00001.safetensors"), "numpy") as f:
        assert sorted(f.keys()) == ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.self_attn.o_proj.bias"]
        s = f.get_slice("model.layers.0.self_attn.o_proj.bias")
        assert (s.get_dtype(), s.get_shape()) == ("BF16", [64])
        assert not f.get_tensor("model.layers.1.self_attn.o_proj.bias").astype(np.float32).any()
    config = json.loads((copy.path / "config.json").read_text())
    assert config["architectures"] == ["OrionForCausalLM"] and config["attention_bias"] is True
    assert config["rms_norm_eps"] == 1e-5 and config["partial_rotary_factor"] == 0.25 and config["num_key_value_heads"] == 2
    assert config["quantkit_adapter"] == {"adapter": "stablelm", "source_architecture": "StableLmForCausalLM", "status": "experimental"}
    provenance = json.loads((copy.path / "quantkit-adapter.json").read_text())
    assert provenance["plan"]["source_arch"] == "StableLmForCausalLM" and provenance["files"]["model.safetensors"] == "linked"


def test_stablelm_without_qkv_bias_changes_no_tensor(tmp_path):
    src = tmp_path / "src"
    build("stablelm-epoch", src)
    copy = adapters.prepare(src, tmp_path / "work")
    assert copy.written_bytes == 0 and [f for f, how in copy.files.items() if f.endswith(".safetensors")] == ["model.safetensors"]
    assert "attention_bias" not in json.loads((copy.path / "config.json").read_text())


# ---- where the working copy may go, and what the checkpoint must hold -----------------------------------


@pytest.mark.parametrize("where, reason", [
    (lambda s: s, "is the model folder itself"),
    (lambda s: s / "adapted", "is inside the model folder"),
    (lambda s: s.parent, "contains the model folder"),
])
def test_working_copy_never_overlaps_the_model_folder(tmp_path, where, reason):
    src = _neox_folder(tmp_path)
    before = _snapshot(src)
    with pytest.raises(AdapterTargetInvalid) as info:
        adapters.prepare(src, where(src))
    assert reason in info.value.reason and reason in format_error(info.value)
    assert _snapshot(src) == before


def test_foreign_folder_is_refused_and_a_previous_copy_replaced(tmp_path):
    src = _neox_folder(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AdapterTargetInvalid, match="not a quantkit working copy"):
        adapters.prepare(src, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    first = adapters.prepare(src, tmp_path / "work")
    (first.path / "stale.safetensors").write_bytes(b"x")
    again = adapters.prepare(src, tmp_path / "work")
    assert not (again.path / "stale.safetensors").exists() and not list(tmp_path.glob(".work.partial"))


@pytest.mark.parametrize("damage, message", [
    (lambda w: w.pop("gpt_neox.layers.0.mlp.dense_4h_to_h.bias"), "missing tensors gpt_neox.layers.0.mlp.dense_4h_to_h.bias"),
    (lambda w: w.__setitem__("gpt_neox.layers.0.attention.extra", np.zeros(1, np.float32)), "does not know: gpt_neox.layers.0.attention.extra"),
    (lambda w: w.__setitem__("gpt_neox.embed_in.weight", np.zeros((6, 8), np.float32)), "gpt_neox.embed_in.weight has shape [6, 8]"),
])
def test_checkpoint_mismatch_is_refused_before_writing(tmp_path, damage, message):
    src = _neox_folder(tmp_path)
    w = load_file(str(src / "model.safetensors"))
    damage(w)
    save_file(w, str(src / "model.safetensors"))
    with pytest.raises(AdapterCheckpointMismatch) as info:
        adapters.prepare(src, tmp_path / "work")
    assert message in info.value.reason
    assert not (tmp_path / "work").exists()


def test_no_weights_is_named(tmp_path):
    src = model_folder(tmp_path, MODELS / "redpajama-3b-chat/config.json")
    with pytest.raises(NoWeights):
        adapters.prepare(src, tmp_path / "work")


def test_pytorch_bin_source(tmp_path):
    torch = pytest.importorskip("torch")  # RedPajama ships pytorch_model.bin only; reading it needs torch
    src = _neox_folder(tmp_path)
    state = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    copy = adapters.prepare(src, tmp_path / "work")
    with safe_open(str(copy.path / "model-adapted-00001.safetensors"), "numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_dtype() == "BF16"
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").astype(np.float32)[:, 0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]


# ---- equivalence with transformers ---------------------------------------------------------------------

# float64 numpy vs transformers' float32: what is left when the maths is the same.
EXACT_TOL = 1e-4
# GPT-NeoX's erf GELU vs exllamav2's tanh GELU: each activation moves by <= 4.7e-4; through two tiny
# layers the logits move by well under 1e-2 (benchmarks/cpu/adapters.json has the figure).
GELU_TOL = 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_working_copy_reproduces_transformers_logits(tmp_path, case):
    fixture = load_fixture(case)
    assert fixture["source_config"] == CASES[case] and fixture["tokens"] == TOKENS
    assert build(case, tmp_path / "src") == fixture["weights_sha256"], "the seeded generator drifted: rerun scripts/adapters_cpu_proof.py"
    copy = adapters.prepare(tmp_path / "src", tmp_path / "work")
    want = np.array(fixture["logits"])
    got = exl2_forward(copy.path, TOKENS)
    if copy.plan.exact:
        assert np.abs(got - want).max() < EXACT_TOL
    else:
        assert copy.plan.differences and "GELU" in copy.plan.differences[0]
        assert np.abs(got - want).max() < GELU_TOL
        # With the source's own erf GELU everything else is exact: the GELU is the only difference.
        assert np.abs(exl2_forward(copy.path, TOKENS, gelu_form="erf") - want).max() < EXACT_TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_a_wrong_qkv_layout_is_caught(tmp_path, monkeypatch):
    # The comparison has teeth: splitting the fused QKV as [3, heads, head_dim] (the layout GPT-NeoX
    # does not use) gives logits far from transformers'.
    h = CASES["gpt-neox"]["hidden_size"]
    monkeypatch.setattr(gpt_neox, "split_rows", lambda heads, hd: tuple(tuple(range(i * h, (i + 1) * h)) for i in range(3)))
    build("gpt-neox", tmp_path / "src")
    copy = adapters.prepare(tmp_path / "src", tmp_path / "work")
    want = np.array(load_fixture("gpt-neox")["logits"])
    assert np.abs(exl2_forward(copy.path, TOKENS, gelu_form="erf") - want).max() > 100 * EXACT_TOL


# ---- the CLI ------------------------------------------------------------------------------------------


def test_vram_names_the_adapter_and_archs_lists_it(tmp_path):
    from click.testing import CliRunner

    from quantkit.cli.main import cli

    folder = model_folder(tmp_path, MODELS / "redpajama-3b-chat/config.json", "redpajama")
    r = CliRunner().invoke(cli, ["vram", str(folder), "--format", "json", "--context", "4k"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["adapter"]["target_arch"] == "Starcoder2ForCausalLM" and data["adapter"]["experimental"] is True
    assert "gpt_neox adapter (experimental" in r.stderr
    listed = json.loads(CliRunner().invoke(cli, ["archs", "--json"]).stdout)["adapters"]
    assert {(a["source"], a["target"], a["experimental"]) for a in listed} >= {("GPTNeoXForCausalLM", "Starcoder2ForCausalLM", True)}
    refused = CliRunner().invoke(cli, ["vram", str(model_folder(tmp_path, STABLELM | {"qk_layernorm": True}, "sl12b"))])
    assert refused.exit_code == 1 and "cannot map qk_layernorm = true" in refused.stderr and "Traceback" not in refused.output


@pytest.mark.parametrize("exc, needle", [
    (AdapterRefused("GPTNeoXForCausalLM", "use_parallel_residual = true", "two norms"), "cannot map use_parallel_residual = true (two norms)"),
    (AdapterCheckpointMismatch("GPTNeoXForCausalLM", "missing tensors x"), "checkpoint does not match its config.json: missing tensors x"),
    (AdapterTargetInvalid(Path("/m"), Path("/m/a"), "is inside the model folder"), "pick a new, empty folder outside the model folder /m"),
    (NoWeights(Path("/m")), "looked for *.safetensors and pytorch_model*.bin"),
    (MissingExtra("torch", "read pytorch_model.bin"), "pip install torch"),
])
def test_error_rows(exc, needle):
    assert needle in format_error(exc)
