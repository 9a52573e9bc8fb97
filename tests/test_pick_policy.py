"""The pick policy `quantkit vram MODEL --gpu N` documents, over the seed models and the usual cards.

Each expected pick is what the policy says (native context; fp16/q8/q6/q4; highest bitrate, then the
better cache; 0.5 GiB headroom; a tight fit only when nothing fits with room to spare); the comment says
why an experienced EXL2 user would agree.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantkit.branches import default_branches
from quantkit.cli.main import cli
from quantkit.model import load_model
from quantkit.plan import PICK_CACHES, fit_gpu, rope_alpha
from quantkit.vram import GiB, CacheMode
from workfolders import seed_folder

# (seed, card GiB, branch, cache, context, tight)
PICKS = [
    # Llama-3-8B, native 8192. 8 GiB: 5_0 (the seed card: "usable on 8GB cards"); FP16 at 8k would leave
    # under 0.5 GiB beyond the headroom, Q8 (practically lossless) leaves room.
    ("llama3-iterative-dpo-8b", 8, "5_0", "q8", 8192, False),
    # 12 GiB: 8_0 with FP16 cache at the native 8k (not 6_5 chasing 32k the model cannot use).
    ("llama3-iterative-dpo-8b", 12, "8_0", "fp16", 8192, False),
    ("llama3-iterative-dpo-8b", 16, "8_0", "fp16", 8192, False),
    ("llama3-iterative-dpo-8b", 24, "8_0", "fp16", 8192, False),
    # Starling-LM-11B: config.json claims 32769 positions but the weights are Starling-7B's, trained at 8k
    # (archs/native_context.toml). 8 GiB: 5.0 bpw of 10.7B weights barely loads: 4k with Q6 cache, tight.
    ("starling-lm-11b-alpha", 8, "5_0", "q6", 4096, True),
    # 12 GiB: 8_0 would only fit with Q4 and under 0.5 GiB to spare; 6_5 holds 8k in FP16 with room.
    ("starling-lm-11b-alpha", 12, "6_5", "fp16", 8192, False),
    ("starling-lm-11b-alpha", 16, "8_0", "fp16", 8192, False),
    ("starling-lm-11b-alpha", 24, "8_0", "fp16", 8192, False),
    # StableLM-3B (Rocket, Zephyr), native 4096, no GQA: 8_0 with FP16 at 4k is 4.6 GiB, on every card.
    ("rocket-3b", 8, "8_0", "fp16", 4096, False),
    ("rocket-3b", 12, "8_0", "fp16", 4096, False),
    ("rocket-3b", 16, "8_0", "fp16", 4096, False),
    ("rocket-3b", 24, "8_0", "fp16", 4096, False),
    ("stablelm-zephyr-3b", 8, "8_0", "fp16", 4096, False),
    ("stablelm-zephyr-3b", 24, "8_0", "fp16", 4096, False),
    # RedPajama-3B chat (GPT-NeoX), fine-tuned at 5120 tokens (its card and config): 8_0, FP16, 5120.
    ("redpajama-3b-chat", 8, "8_0", "fp16", 5120, False),
    ("redpajama-3b-chat", 12, "8_0", "fp16", 5120, False),
    ("redpajama-3b-chat", 16, "8_0", "fp16", 5120, False),
    ("redpajama-3b-chat", 24, "8_0", "fp16", 5120, False),
]


@pytest.mark.parametrize("seed, gib, branch, cache, context, tight", PICKS, ids=[f"{p[0]}-{p[1]}GiB" for p in PICKS])
def test_seed_picks(tmp_path, seed, gib, branch, cache, context, tight):
    r = CliRunner().invoke(cli, ["vram", str(seed_folder(tmp_path, seed)), "--gpu", f"{gib}GiB", "--format", "json"])
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout)["fit"]
    p = fit["pick"]
    assert (p["branch"], p["cache"], p["context"], p["tight"]) == (branch, cache, context, tight)
    assert p["context"] <= fit["native_context"] and not p["beyond_native"]
    assert p["total_bytes"] + fit["headroom_bytes"] <= gib * GiB
    assert "fp8" not in {x["cache"] for x in fit["rows"]}
    assert fit["sentence"].startswith(f"Pick: {branch} ")
    assert ("tight fit" in fit["sentence"]) == tight


def test_sentence_names_the_pick_and_the_native_context(tmp_path):
    r = CliRunner().invoke(cli, ["vram", str(seed_folder(tmp_path, "llama3-iterative-dpo-8b")), "--gpu", "12GiB", "--format", "markdown"])
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("Pick: 8_0 (8 bpw, lm_head 8) with FP16 cache at 8192 tokens (the native context): ")
    assert "with 0.5 GiB headroom" in last and "bits x parameters" in last


def test_context_beyond_native_asks_for_rope_scaling(tmp_path):
    m = load_model(seed_folder(tmp_path, "llama3-iterative-dpo-8b"))
    fit = fit_gpu(m, default_branches(), list(PICK_CACHES), 24 * GiB, target_context=32768)
    assert fit.pick.context == 32768 and fit.pick.beyond_native and fit.rope_scale == 4
    assert any("RoPE scaling x4" in c and f"{rope_alpha(4):.2f}" in c for c in fit.caveats)
    assert "RoPE scaling x4" in fit.sentence


def test_explicit_shorter_context_is_honoured(tmp_path):
    m = load_model(seed_folder(tmp_path, "starling-lm-11b-alpha"))
    fit = fit_gpu(m, default_branches(), list(PICK_CACHES), 12 * GiB, target_context=4096)
    assert (fit.pick.branch, fit.pick.context) == ("8_0", 4096)
    assert "below the native 8192" in fit.sentence


def test_native_override_is_said(tmp_path):
    m = load_model(seed_folder(tmp_path, "starling-lm-11b-alpha"))
    assert m.shape.max_positions == 32769 and m.native_context == 8192
    r = CliRunner().invoke(cli, ["vram", str(seed_folder(tmp_path, "starling-lm-11b-alpha")), "--format", "json"])
    data = json.loads(r.stdout)
    assert data["native_context"] == 8192
    assert any("not the 32769 config.json claims" in w for w in data["warnings"])


def test_fixed_config_is_read_as_it_is(tmp_path):
    """The override holds only while the config still claims the edited length."""
    folder = seed_folder(tmp_path, "starling-lm-11b-alpha")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 8192}))
    assert load_model(folder).native_context == 8192 and load_model(folder).native_override is None


def test_fp8_is_never_picked_even_when_asked(tmp_path):
    m = load_model(seed_folder(tmp_path, "llama3-iterative-dpo-8b"))
    fit = fit_gpu(m, default_branches(), [CacheMode.FP8, CacheMode.Q4], 8 * GiB)
    assert fit.pick.cache == "q4"
    assert any("fp8 cache not considered" in c for c in fit.caveats)


def test_headroom_changes_the_pick_and_none_says_what_would_fit(tmp_path):
    m = load_model(seed_folder(tmp_path, "starling-lm-11b-alpha"))
    fit = fit_gpu(m, default_branches(), list(PICK_CACHES), 8 * GiB, headroom_bytes=1 * GiB)
    assert fit.pick is None
    assert fit.sentence.startswith("Pick: none: nothing fits 7.0 GiB")
    assert "--headroom 0" in fit.sentence and "lower bitrate" in fit.sentence
    assert fit_gpu(m, default_branches(), list(PICK_CACHES), 8 * GiB, headroom_bytes=0).pick.branch == "5_0"


def test_falls_back_to_a_shorter_context(tmp_path):
    m = load_model(seed_folder(tmp_path, "llama3-iterative-dpo-8b"))
    fit = fit_gpu(m, default_branches(), list(PICK_CACHES), int(6.9 * GiB))
    assert fit.pick is not None and fit.pick.context < 8192
    assert "shorter than the native 8192 tokens" in fit.sentence
    asked = fit_gpu(m, default_branches(), list(PICK_CACHES), int(6.9 * GiB), target_context=8192)
    assert "shorter than the 8192 tokens asked for" in asked.sentence


@pytest.mark.parametrize("gpu", ["12", "12GiB", "12GB", "12G", "12288MiB"])
def test_gpu_size_spellings(tmp_path, gpu):
    r = CliRunner().invoke(cli, ["vram", str(seed_folder(tmp_path, "llama3-iterative-dpo-8b")), "--gpu", gpu, "--format", "json"])
    assert json.loads(r.stdout)["fit"]["gpu_bytes"] == 12 * GiB
